#!/usr/bin/env bash
# The main job on a bundled default, end to end, on CPU:
#   1. build a tiny offline tokenizer and a tiny random Chameleon (the real loading path),
#   2. pre-tokenize the bundled photos + captions into two datasets (2 ranks each) and merge,
#   3. inspect and verify a dataset, dry-run the two-dataset mixture,
#   4. train with DeepSpeed ZeRO-3 on 2 CPU processes, kill the run mid-way, resume it,
#   5. export a Hugging Face folder and load it back,
#   6. render the first sample of each dataset back to pictures (lumina render, tiny VQGAN).
# Everything goes under $DEMO_OUT (default ./demo_out). Rerunning starts from scratch.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=$(realpath -m "${DEMO_OUT:-demo_out}")
STEPS=${DEMO_STEPS:-40}
KILL_AT=${DEMO_KILL_AT:-20}

[ "${DEMO_SKIP_SETUP:-0}" = 1 ] || bash scripts/setup.sh
. .venv/bin/activate
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$ROOT/.cache/torch_extensions}
export TOKENIZERS_PARALLELISM=false
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

rm -rf "$OUT"
mkdir -p "$OUT"
ASSETS=$ROOT/lumina/assets/demo

say "1/5 tiny tokenizer + tiny Chameleon (random LM; VQ fitted to the bundled photos) + VQGAN decoder -> $OUT/tiny"
lumina make-tiny --out "$OUT/tiny"

say "2/5 pre-tokenize bundled photos into two datasets (2 CPU ranks each, then merge)"
for name in captions vqa; do
  NPROC=2 PYTHON=python bash scripts/pre_tokenize.sh \
    --in_filename "$ASSETS/$name.json" --out_dir "$OUT/data/$name" --target_size 256 \
    --image_root "$ASSETS" --tokenizer "$OUT/tiny/tokenizer" --vq_model "$OUT/tiny/model" --batch_size 4 \
    --max_samples_per_shard 4 --crop center
done

say "3/5 look inside: inspect, verify, mixture dry run"
wds-tools inspect "$OUT/data/captions/index.json" --limit 6
first_key=$(wds-tools inspect "$OUT/data/vqa/index.json" --json | python -c 'import json,sys; print(json.load(sys.stdin)["samples"][0]["key"])')
wds-tools inspect "$OUT/data/vqa/index.json" --key "$first_key" --tokenizer "$OUT/tiny/tokenizer"
wds-tools verify "$OUT/data/captions/index.json"
wds-tools verify "$OUT/data/vqa/index.json"
cat > "$OUT/data.yaml" <<EOF
# Two datasets, mixed 70/30 by samples; small datasets cycle through reshuffled epochs.
seed: 0
weight_by: samples
datasets:
  - {name: captions, manifest: data/captions/index.json, weight: 0.7}
  - {name: vqa, manifest: data/vqa/index.json, weight: 0.3}
EOF
wds-tools mix "$OUT/data.yaml" --samples 200

say "4/5 train: ZeRO-3 on 2 CPU processes for $STEPS steps; killed after step $KILL_AT, then resumed"
TRAIN=(torchrun --nproc_per_node 2 --master_port "${DEMO_PORT:-29517}" -m lumina.train
  --deepspeed_config ds_configs/zero3.json --data_config "$OUT/data.yaml"
  --init_from "$OUT/tiny/model" --max_seq_len 512 --micro_batch_size 2 --grad_accum 1
  --lr 3e-3 --warmup_steps 5 --lr_schedule constant --max_steps "$STEPS" --save_every 10
  --keep_last 2 --log_every 5 --num_workers 1 --output_dir "$OUT/run" --progress_bar false)
# Once the checkpoint of step $KILL_AT is complete, the launcher and every worker get SIGKILL,
# like a preempted job (torchrun puts its workers in sessions of their own: walk the tree).
tree() { local c; for c in $(pgrep -P "$1"); do tree "$c"; done; echo "$1"; }
"${TRAIN[@]}" > "$OUT/train-part1.log" 2>&1 &
pid=$!
tail -n +1 -f "$OUT/train-part1.log" --pid "$pid" | grep --line-buffered -E "^step|resumed|saved|error" &
ckpt=$(printf "%s/run/checkpoints/step_%08d" "$OUT" "$KILL_AT")
until grep -q "saved checkpoint $ckpt" "$OUT/train-part1.log" 2>/dev/null; do
  if ! kill -0 "$pid" 2>/dev/null; then echo "training stopped before step $KILL_AT; see $OUT/train-part1.log" >&2; exit 1; fi
  sleep 0.5
done
kill -KILL $(tree "$pid") 2>/dev/null || true
wait "$pid" 2>/dev/null || true
echo "-- killed the run (SIGKILL to every process) after step $KILL_AT; rerunning the same command"
"${TRAIN[@]}" 2>&1 | tee "$OUT/train-part2.log" | grep -E "^step|resumed|saved|error"
python - "$OUT/run" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl")]
first, last = rows[0], rows[-1]
print(f"loss: {first['loss']:.3f} at step {first['step']} -> {last['loss']:.3f} at step {last['step']}")
PY

say "5/5 export a Hugging Face folder and load it back"
python -m lumina.export --output_dir "$OUT/run" --out "$OUT/export"
python - "$OUT/export" <<'EOF'
import sys, torch
from transformers import AutoTokenizer, ChameleonForConditionalGeneration
m = ChameleonForConditionalGeneration.from_pretrained(sys.argv[1])
tok = AutoTokenizer.from_pretrained(sys.argv[1])
print(f"loaded {sys.argv[1]}: {sum(p.numel() for p in m.parameters()):,} parameters, vocab {len(tok)}")
EOF

say "render the first sample of each dataset back to pictures (PNG, tiny VQGAN decoder)"
for name in captions vqa; do
  key=$(wds-tools inspect "$OUT/data/$name/index.json" --json | python -c 'import json,sys; print(json.load(sys.stdin)["samples"][0]["key"])')
  lumina render "$OUT/data/$name/index.json" --key "$key" --out "$OUT/render/$name" --vq "$OUT/tiny"
done

say "done: everything is under $OUT"
cat <<EOF
  tiny tokenizer + model   $OUT/tiny/{tokenizer,model}
  datasets (manifests)     $OUT/data/captions/index.json  $OUT/data/vqa/index.json
  pre-tokenize errors      $OUT/data/*/errors-r*.jsonl
  data config              $OUT/data.yaml
  training run             $OUT/run   (checkpoints, metrics; logs: $OUT/train-part*.log)
  exported HF model        $OUT/export
  rendered pictures        $OUT/render/{captions,vqa}/*.png  (mosaics, one colour per 16 x 16 patch: the tiny VQGAN)
EOF

# Look at the data in a browser: the mixture, each dataset's figures, every sample decoded, image
# blocks drawn by the tiny VQGAN decoder (Ctrl-C stops the server; it listens on 127.0.0.1 only).
cat <<EOF
Browse it (prints the URL to open):
  lumina view $OUT/data.yaml --vq $OUT/tiny
  (the same with the generic flags: wds-tools view $OUT/data.yaml --tokenizer $OUT/tiny/tokenizer
   --renderer lumina.render:load_renderer --renderer-arg $OUT/tiny)
EOF

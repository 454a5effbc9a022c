#!/usr/bin/env bash
# The GPU checks of the pre-tokenize and trainer issues, as one short script for a lent machine
# (one H100/H200, no network). Python packages the image lacks come as wheels in .gpu_wheels/
# (git-ignored; carry it), fetched beforehand on a machine with PyPI access:
#   pip download -d .gpu_wheels --no-deps deepspeed==0.19.8
#   pip download -d .gpu_wheels --no-deps --python-version 3.12 --only-binary=:all: \
#       --platform manylinux2014_x86_64 hjson webdataset braceexpand
#   pip download -d .gpu_wheels --python-version 3.12 --only-binary=:all: \
#       --platform manylinux2014_x86_64 pydantic
#   OUT=/some/folder bash benchmarks/gpu_checks.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false
t0=$(date +%s)
stamp() { echo "[gpu_checks +$(( $(date +%s) - t0 ))s] $*"; }

stamp "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -m pip install -q --no-index --no-build-isolation --find-links .gpu_wheels \
  hjson pydantic webdataset braceexpand deepspeed > "$OUT/pip.txt" 2>&1 || { tail -5 "$OUT/pip.txt"; }
python3 -c "import torch, transformers, deepspeed; print('torch', torch.__version__, 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__)" | tee -a "$OUT/gpu.txt"

for T in 512 768; do
  stamp "pre-tokenize encoder, real-size VQ, T=$T: batch-1 fp32 vs batched bf16"
  timeout 150 python3 benchmarks/bench_pretokenize.py --device cuda --vq_config real --target_size "$T" \
    --precision bf16 --batch_size 16 --encoder_images 64 --num_items 64 --num_workers 8 \
    > "$OUT/pretok_$T.txt" 2>&1
  tail -15 "$OUT/pretok_$T.txt"
done

stamp "trainer vs bare ZeRO-3 loop, ~1B Chameleon, 4096 tokens"
timeout 300 deepspeed --num_gpus 1 benchmarks/bench_train_gpu.py --out "$OUT/train.json" \
  > "$OUT/train.txt" 2>&1
tail -25 "$OUT/train.txt"

# Packed vs padded (issue 12): the same length mix (half 60-300-token chat turns, half
# 1,024-2,400-token image items), one process per row; flash-attention only where installed.
sides=("padded" "packed --attn sdpa" "packed --attn flex_attention")
python3 -c "import flash_attn" 2>/dev/null && sides+=("packed --attn flash_attention_2")
for side in "${sides[@]}"; do
  name=$(echo "$side" | tr -s ' -' '_')
  stamp "trainer on the length mix, ~1B Chameleon, 4096-token rows: $side"
  # shellcheck disable=SC2086
  timeout 150 deepspeed --num_gpus 1 benchmarks/bench_train_gpu.py --order $side \
    --micro_batch_size 2 --warmup 5 --steps 5 --out "$OUT/train_$name.json" \
    > "$OUT/train_$name.txt" 2>&1
  grep -E "^\| (padded|packed)" "$OUT/train_$name.txt" || tail -5 "$OUT/train_$name.txt"
done

stamp "packed = padded loss and gradients on CUDA (tests/test_packing.py, gpu marker)"
timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_packing.py \
  > "$OUT/test_packing_gpu.txt" 2>&1
tail -5 "$OUT/test_packing_gpu.txt"
stamp "done"

#!/usr/bin/env bash
# Pre-tokenize one input file on every visible GPU (or N CPU processes), then merge.
#
#   scripts/pre_tokenize.sh --in_filename IN.json --out_dir OUT --target_size 768 \
#       --tokenizer TOK --vq_model VQ [any other `lumina pre-tokenize` flag]
#
# One rank per GPU (CUDA_VISIBLE_DEVICES, or all that torch sees). Without GPUs: NPROC ranks
# on CPU (env NPROC, default 1). Rank 0 shows its progress bar; every rank logs to
# OUT/logs/rank-R.log (LOG_DIR, default ./pretok-logs, when OUT is s3://...). Rerunning the same
# command resumes every rank (finished ranks are skipped quickly) and merges into
# OUT/index.json. Several nodes: scripts/srun_pre_tokenize.sh. Env: PYTHON (default python),
# NPROC, LOG_DIR.
set -euo pipefail

PYTHON=${PYTHON:-python}
. "$(dirname "$0")/pretok_args.sh"
OUT=$(pretok_out pre_tokenize.sh "the script sets it per rank" "$@") || exit 2
if [[ -z "$OUT" ]]; then
  echo "usage: $0 --in_filename IN --out_dir OUT [lumina pre-tokenize flags]" >&2
  exit 2
fi

if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
  IFS=',' read -r -a GPUS <<< "$CUDA_VISIBLE_DEVICES"
else
  NGPU=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
  GPUS=()
  for ((g = 0; g < NGPU; g++)); do GPUS+=("$g"); done
fi
if ((${#GPUS[@]} > 0)); then
  N=${#GPUS[@]}
else
  N=${NPROC:-1}
fi

if [[ "$OUT" == s3://* ]]; then LOGS=${LOG_DIR:-pretok-logs}; else LOGS=${LOG_DIR:-$OUT/logs}; fi
mkdir -p "$LOGS"
echo "pre_tokenize.sh: $N rank(s) on $( ((${#GPUS[@]} > 0)) && echo "GPUs ${GPUS[*]}" || echo CPU ); logs in $LOGS" >&2
pids=()
for ((r = 0; r < N; r++)); do
  log="$LOGS/rank-$r.log"
  if ((${#GPUS[@]} > 0)); then
    env_gpu=(env "CUDA_VISIBLE_DEVICES=${GPUS[$r]}")
    dev=(--device cuda)
  else
    env_gpu=(env)
    dev=(--device cpu)
  fi
  if ((r == 0)); then
    "${env_gpu[@]}" "$PYTHON" -m lumina.pre_tokenize --splits "$N" --rank "$r" "${dev[@]}" "$@" 2> >(tee "$log" >&2) &
  else
    "${env_gpu[@]}" "$PYTHON" -m lumina.pre_tokenize --splits "$N" --rank "$r" "${dev[@]}" --no_progress "$@" > "$log" 2>&1 &
  fi
  pids+=($!)
done

failed=()
for ((r = 0; r < N; r++)); do
  if ! wait "${pids[$r]}"; then failed+=("$r"); fi
done
if ((${#failed[@]} > 0)); then
  echo "pre_tokenize.sh: rank(s) ${failed[*]} failed (see $LOGS); rerun the same command to resume" >&2
  exit 1
fi
for ((r = 1; r < N; r++)); do grep -h "^rank .* items in" "$LOGS/rank-$r.log" >&2 || true; done
"$PYTHON" -m wds_tools.concat_record --sub_record_dir "$OUT" --save_path "${OUT%/}/index.json"

#!/usr/bin/env bash
# Pre-tokenize on several nodes under SLURM: one task per GPU, then the merge.
#
#   sbatch --nodes 8 --ntasks-per-node 8 --gpus-per-node 8 --cpus-per-task 12 \
#       scripts/srun_pre_tokenize.sh --in_filename 's3://raw/laion/{000000..004095}.tar' \
#       --out_dir s3://bucket/laion-t2i --target_size 768 \
#       --tokenizer /models/Lumina-mGPT-7B-768 --vq_model /models/Lumina-mGPT-7B-768
#
# Every task runs `python -m lumina.pre_tokenize --splits $SLURM_NTASKS --rank $SLURM_PROCID`
# on its own GPU (the SLURM_LOCALID-th of the node's visible GPUs, unless SLURM already gave it
# one); inputs are split by shard or file (shard i -> task i mod N). When every task has
# finished, this batch script (running after `srun` returns, on the first node) merges the
# shard indexes into OUT/index.json. --out_dir is s3://... or a folder every node sees.
#
# Requeue-safe (sbatch --requeue, or resubmitting the same command): every task resumes from
# what its earlier run completed (finished tasks return at once) and the merge is redone.
# Env: PYTHON (default python), PRETOK_DEVICE (default: cuda if a GPU is visible, else cpu),
# SRUN_ARGS (extra srun options), STAGING_DIR (node-local folder for shards before upload).
#SBATCH --job-name=lumina-pretok
#SBATCH --output=%x-%j.out
#SBATCH --requeue
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
PYTHON=${PYTHON:-python}
[ -f scripts/pretok_args.sh ] || {
  echo "srun_pre_tokenize.sh: submit from the repository root (no scripts/pretok_args.sh in $PWD)" >&2
  exit 2
}
. scripts/pretok_args.sh
OUT=$(pretok_out srun_pre_tokenize.sh "SLURM sets it per task" "$@") || exit 2
if [[ -z "$OUT" ]]; then
  echo "usage: sbatch [slurm options] $0 --in_filename IN --out_dir OUT [lumina pre-tokenize flags]" >&2
  exit 2
fi
if [[ -z "${SLURM_NTASKS:-}" ]]; then
  echo "srun_pre_tokenize.sh: not inside a SLURM allocation (submit it with sbatch)" >&2
  exit 2
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
export PYTHON PRETOK_DEVICE=${PRETOK_DEVICE:-}
staging=()
if [[ -n "${STAGING_DIR:-}" ]]; then staging=(--staging_dir "$STAGING_DIR"); fi
echo "srun_pre_tokenize.sh: $SLURM_NTASKS task(s) -> $OUT" >&2

# One task: pick its GPU, show progress on task 0 only, run its rank.
task='
IFS="," read -r -a gpus <<< "${CUDA_VISIBLE_DEVICES:-}"
if ((${#gpus[@]} > 1)); then export CUDA_VISIBLE_DEVICES=${gpus[$((SLURM_LOCALID % ${#gpus[@]}))]}; fi
dev=${PRETOK_DEVICE:-}
if [[ -z "$dev" ]]; then if [[ -n "${gpus[0]:-}" ]]; then dev=cuda; else dev=cpu; fi; fi
quiet=(); if ((SLURM_PROCID != 0)); then quiet=(--no_progress); fi
exec "$PYTHON" -m lumina.pre_tokenize --splits "$SLURM_NTASKS" --rank "$SLURM_PROCID" \
  --device "$dev" "${quiet[@]}" "$@"
'
# shellcheck disable=SC2086
if ! srun --kill-on-bad-exit=0 ${SRUN_ARGS:-} bash -c "$task" _ "${staging[@]}" "$@"; then
  echo "srun_pre_tokenize.sh: some task(s) failed; resubmit the same command to resume" >&2
  exit 1
fi
"$PYTHON" -m wds_tools.concat_record --sub_record_dir "$OUT" --save_path "${OUT%/}/index.json"

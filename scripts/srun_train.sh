#!/usr/bin/env bash
# Train on several nodes under SLURM: one task per GPU, started by srun, no launcher in between.
#
#   sbatch --nodes 4 --ntasks-per-node 8 --gpus-per-node 8 --cpus-per-task 12 \
#       scripts/srun_train.sh --data_config mix.yaml --init_from /models/chameleon-7b \
#       --output_dir /shared/runs/7b --micro_batch_size 8 --max_steps 20000
#
# Each task reads its rank from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID (lumina.train maps
# them to RANK / WORLD_SIZE / LOCAL_RANK); the first node of the allocation is the rendezvous.
# --output_dir must be on a filesystem every node sees (checkpoints are written by all ranks).
# Requeue-safe: a restarted job resumes from the latest checkpoint there.
#SBATCH --job-name=lumina-train
#SBATCH --output=%x-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
DS_CONFIG=${DS_CONFIG:-ds_configs/zero3.json}
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
export MASTER_PORT=${MASTER_PORT:-29500}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}
srun --kill-on-bad-exit=1 bash -c 'exec python -m lumina.train "$@"' _ \
  --deepspeed_config "$DS_CONFIG" "$@"

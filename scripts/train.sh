#!/usr/bin/env bash
# Train on one node with the deepspeed launcher (all GPUs of the node; CPU: NPROC processes).
#
#   bash scripts/train.sh --data_config mix.yaml --init_from /models/chameleon-7b \
#       --output_dir runs/7b --micro_batch_size 8 --max_steps 20000 --save_every 1000
#
# Every flag goes to lumina.train (python -m lumina.train --help lists them). Environment:
#   DS_CONFIG   DeepSpeed JSON (default ds_configs/zero3.json; ds_configs/zero3_offload.json
#               offloads the optimizer to CPU memory)
#   NUM_GPUS    processes on this node (default: all visible GPUs, or NPROC=2 without GPUs)
#   MASTER_PORT rendezvous port (default 29500)
# Rerunning the same command resumes from the latest checkpoint in --output_dir.
set -euo pipefail
cd "$(dirname "$0")/.."
DS_CONFIG=${DS_CONFIG:-ds_configs/zero3.json}
if [ -z "${NUM_GPUS:-}" ]; then
  NUM_GPUS=$(python -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
  [ "$NUM_GPUS" -gt 0 ] || NUM_GPUS=${NPROC:-2}  # CPU: gloo processes
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
exec deepspeed --num_gpus "$NUM_GPUS" --master_port "${MASTER_PORT:-29500}" \
  --module lumina.train --deepspeed_config "$DS_CONFIG" "$@"

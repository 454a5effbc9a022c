#!/usr/bin/env bash
# Before/after in one run: bench_stream on disk (reader, loader, DataLoader 2 workers, first batch
# and peak RSS at 10M samples) for a baseline commit and the working tree, alternated ROUNDS
# times so both sides see the same machine. Usage (from the repository root, venv active):
#   bash benchmarks/bench_before_after.sh BASE_REV [ROUNDS]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BASE_REV=${1:?usage: bench_before_after.sh BASE_REV [ROUNDS]}
ROUNDS=${2:-3}
BASE=$(mktemp -d)
git -C "$ROOT" worktree add -f "$BASE" "$BASE_REV" >/dev/null
trap 'git -C "$ROOT" worktree remove --force "$BASE"' EXIT
export OMP_NUM_THREADS=1
for round in $(seq "$ROUNDS"); do
  for side in base main; do
    root=$BASE; [ $side = main ] && root=$ROOT
    echo "=== round $round $side" 
    (cd $root && PYTHONPATH=$root timeout 1200 python benchmarks/bench_stream.py --sources disk --samples 20000 --repeat 2 --big-shards 10000 --no-docs 2>&1 | grep "^|")
  done
done

#!/usr/bin/env bash
# Set up ./.venv (if needed) and run the whole test suite, slow tests included.
# Extra arguments go to pytest, e.g.  bash scripts/test.sh -m "not slow"  or  -k format
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec python -m pytest -q -p no:cacheprovider tests "$@"

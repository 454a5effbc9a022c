#!/usr/bin/env bash
# Set up ./.venv (if needed) and run the whole test suite, slow tests included.
# Without arguments: the fast lane first (ruff lint + format check, mypy, then the tests not
# marked slow, stopping at the first failure), then the slow tests; a broken import fails in
# seconds. Extra arguments go straight to pytest instead, e.g.
#   bash scripts/test.sh -m "not slow"      bash scripts/test.sh -k format
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PYTEST=(python -m pytest -q -p no:cacheprovider tests)
if [ "$#" -gt 0 ]; then
  exec "${PYTEST[@]}" "$@"
fi
echo "== fast lane: lint, format, types"
ruff check .
ruff format --check .
mypy
echo "== fast lane: tests not marked slow"
"${PYTEST[@]}" -m "not slow" -x
echo "== slow tests"
"${PYTEST[@]}" -m slow

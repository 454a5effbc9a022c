#!/usr/bin/env bash
# Create ./.venv and install the project with everything the demo and the tests need.
# CPU torch is installed first and explicitly (TORCH_SPEC overrides, e.g. "torch==2.5.1" or a CUDA
# build from your index); the project itself declares torch>=2.4.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
. "$VENV/bin/activate"
stamp="$VENV/.installed-$(cat setup.cfg pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  python -m pip install -q --upgrade pip
  python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
  python -m pip install -q -e ".[dev]"
  touch "$stamp"
fi
echo "environment ready: $VENV ($(python -c 'import torch; print("torch", torch.__version__)'))"

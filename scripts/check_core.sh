#!/usr/bin/env bash
# The core without torch: a fresh venv with only `pip install -e .` (the declared core
# dependencies), in which `import torch` fails, runs wds-tools inspect/verify/merge/mix/stream
# on a small two-dataset mix written by wds_tools' own writer. CI runs it before the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
VENV=${CORE_VENV:-$ROOT/.cache/core-venv}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
"$VENV/bin/python" -m pip install -q -e "$ROOT"
cd "$WORK"   # nothing of the checkout on sys.path but the installed package
if "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "check_core: torch is importable in the core venv; the check would prove nothing" >&2
  exit 1
fi
"$VENV/bin/python" - <<'PY'
import numpy as np, yaml
from wds_tools.writer import ShardWriter
from wds_tools.merge import merge
rng = np.random.default_rng(0)
for name, n in (("chat", 90), ("t2i", 40)):
    for rank in range(2):
        with ShardWriter(f"data/{name}", vocab_size=65536, rank=rank, world_size=2,
                         max_samples=25) as w:
            for i in range(n // 2):
                ids = rng.integers(0, 65536, int(rng.integers(8, 200))).astype(np.uint16)
                labels = ids.astype(np.int64)
                labels[: len(ids) // 3] = -100
                w.write(f"{name}-{rank}-{i:05d}", ids, labels=labels, meta={"source": name})
    if name == "chat":
        merge(f"data/{name}")
yaml.safe_dump({"seed": 0, "datasets": [{"name": "chat", "manifest": "data/chat/index.json",
                                         "weight": 0.7},
                                        {"name": "t2i", "manifest": "data/t2i/index.json",
                                         "weight": 0.3}]}, open("mix.yaml", "w"))
PY
W="$VENV/bin/wds-tools"
"$W" merge data/t2i
"$W" inspect data/chat/index.json --limit 3 >/dev/null
"$W" verify data/t2i/index.json
"$W" mix mix.yaml --samples 2000 >/dev/null
"$W" stream mix.yaml --batch-size 4 --batches 3 --world-size 2 --rank 1 >stream.jsonl
[ "$(wc -l <stream.jsonl)" = 3 ]
"$VENV/bin/python" -c "import sys, wds_tools.loader, wds_tools.reader, wds_tools.wds; assert 'torch' not in sys.modules"
echo "check_core: ok (inspect, verify, merge, mix, stream without torch)"

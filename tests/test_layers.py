"""The house rules that keep the code easy to carry on: imports run one way (no cycle inside
``wds_tools`` or ``lumina``), ``wds_tools`` never imports the model side, and the core works
without torch (every module but the DataLoader-facing one imports, and the CLIs run)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from typing import Dict, List, Set

import pytest

from loader_fixtures import make_dataset, write_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("wds_tools", "lumina")
TORCH_FACING = {"wds_tools.torch_loader"}

# A child interpreter in which ``import torch`` fails, as on a machine without torch.
NO_TORCH = """
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked in this test)")
sys.meta_path.insert(0, _NoTorch())
"""


def _modules() -> Dict[str, str]:
    out = {}
    for pkg in PACKAGES:
        for dirpath, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3]
                    name = rel.replace(os.sep, ".")
                    out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = os.path.join(
                        ROOT, rel + ".py"
                    )
    return out


def _imports(name: str, path: str, known: Set[str] = frozenset()) -> Set[str]:
    """Every module named by an import anywhere in the file (function-level ones included);
    ``from pkg import sub`` of a known submodule counts as an import of ``sub`` only."""
    is_pkg = path.endswith("__init__.py")
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found: Set[str] = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parent = base[: len(base) - node.level + 1]
                mod = ".".join(parent + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            subs = {f"{mod}.{a.name}" for a in node.names} & set(known)  # "from . import io"
            found.update(subs)
            if len(subs) < len(node.names):
                found.add(mod)
    return found


def _graph() -> Dict[str, Set[str]]:
    mods = _modules()
    return {m: {i for i in _imports(m, p, set(mods)) if i in mods and i != m} for m, p in mods.items()}


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    out: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_inside_the_packages():
    graph = _graph()
    assert "wds_tools.io" in graph and "wds_tools.transport" in graph["wds_tools.io"]
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_transport_below_cache_below_io():
    graph = _graph()
    assert not graph["wds_tools.transport"]  # the bottom layer imports nothing of ours
    assert graph["wds_tools.cache"] == {"wds_tools.transport"}
    assert "wds_tools.io" not in graph["wds_tools.cache"]


def test_wds_tools_never_imports_the_model_side():
    for name, path in _modules().items():
        if name.startswith("wds_tools"):
            bad = {
                i for i in _imports(name, path) if i.split(".")[0] in ("lumina", "transformers", "deepspeed")
            }
            assert not bad, f"{name} imports {sorted(bad)}"


def _run_without_torch(code: str, cwd: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", NO_TORCH + code],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )


def test_the_core_imports_without_torch(tmp_path):
    core = sorted(
        m
        for m in _modules()
        if m.startswith("wds_tools") and m not in TORCH_FACING and not m.endswith("__main__")
    )
    p = _run_without_torch(
        "import importlib\n"
        f"for m in {core!r}:\n    importlib.import_module(m)\n"
        "assert 'torch' not in sys.modules\n"
        "try:\n    import torch\nexcept ImportError:\n    print('blocked')\n",
        str(tmp_path),
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == "blocked"


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("core"))
    a = make_dataset(root, "a", 0, 120, samples_per_shard=40)
    b = make_dataset(root, "b", 1, 60, samples_per_shard=30)
    cfg = write_config(
        os.path.join(root, "mix.yaml"), [{"manifest": a, "weight": 2}, {"manifest": b, "weight": 1}]
    )
    return root, a, b, cfg


def _cli(args: List[str], cwd: str) -> subprocess.CompletedProcess:
    return _run_without_torch(
        "from wds_tools.cli import main\n"
        f"code = main({args!r})\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "sys.exit(code)\n",
        cwd,
    )


def test_the_cli_works_without_torch(two_datasets, tmp_path):
    """inspect, verify, merge, mix and stream (no workers) with torch blocked."""
    root, a, b, cfg = two_datasets
    for args in (["inspect", a], ["verify", a], ["mix", cfg, "--samples", "300"]):
        p = _cli(args, str(tmp_path))
        assert p.returncode == 0, (args, p.stderr[-2000:])
    os.remove(b)
    p = _cli(["merge", os.path.dirname(b)], str(tmp_path))
    assert p.returncode == 0 and os.path.exists(b), p.stderr[-2000:]
    out = tmp_path / "s.jsonl"
    p = _cli(
        ["stream", cfg, "--rank", "0", "--batch-size", "4", "--batches", "5", "--output", str(out)],
        str(tmp_path),
    )
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 5 and all(len(r["samples"]) == 4 for r in rows)
    # the same batches as the torch loader gives
    from wds_tools.loader import build_loader

    loader = build_loader(cfg, rank=0, world_size=1, batch_size=4, max_seq_len=4096)
    it = iter(loader)
    for r in rows:
        assert [s["key"] for s in r["samples"]] == next(it)["__key__"]
    p = _cli(["stream", cfg, "--rank", "0", "--num-workers", "2"], str(tmp_path))
    assert p.returncode == 2 and "need torch" in p.stderr and "Traceback" not in p.stderr
    # the whole-run replay simulates the workers in process: no torch needed
    p = _cli(["stream", cfg, "--num-workers", "2", "--world-size", "2", "--steps", "2"], str(tmp_path))
    assert p.returncode == 0 and len(p.stdout.splitlines()) == 4, p.stderr[-2000:]

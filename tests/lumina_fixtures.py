"""Shared, cached tiny artifacts for the lumina tests (no network).

The ``tiny_dirs`` fixture (in ``conftest.py``) builds them once per test process, whichever
module asks first.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path


@functools.lru_cache(maxsize=None)
def build_tiny_dirs() -> tuple[str, str]:
    """(tokenizer_dir, model_dir) of the tiny tokenizer and tiny random Chameleon."""
    from lumina.tiny import build_tiny_chameleon, build_tiny_tokenizer

    root = Path(tempfile.mkdtemp(prefix="lumina_tiny_"))
    atexit.register(shutil.rmtree, root, True)
    tok = build_tiny_tokenizer(str(root / "tokenizer"))
    model = build_tiny_chameleon(str(root / "model"), tok)
    return tok, model


def slow_adapter(item):
    """An ``--adapter`` for kill/resume tests: the standard item, a little slower."""
    import time

    time.sleep(0.15)
    return item


def killable_pretok_cmd(in_file, out_dir, tiny, target_size: int) -> list:
    """``python -m lumina.pre_tokenize`` for the SIGKILL-and-rerun tests: small batches and
    shards, one worker, and :func:`slow_adapter`, so a kill lands mid-run."""
    import sys

    return [
        sys.executable,
        "-m",
        "lumina.pre_tokenize",
        "--in_filename",
        str(in_file),
        "--out_dir",
        str(out_dir),
        "--tokenizer",
        tiny[0],
        "--vq_model",
        tiny[1],
        "--target_size",
        str(target_size),
        "--num_workers",
        "1",
        "--batch_size",
        "2",
        "--max_samples_per_shard",
        "3",
        "--no_progress",
        "--adapter",
        "lumina_fixtures:slow_adapter",
    ]


def smooth_image(h: int, w: int, seed: int, channels: int = 3):
    """A deterministic, compressible test picture (uint8 array)."""
    import numpy as np

    rs = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    planes = [
        127 + 120 * np.sin(xx / rs.uniform(5, 40) + yy / rs.uniform(5, 40) + rs.uniform(0, 6))
        for _ in range(channels)
    ]
    return (np.stack(planes, -1) + rs.randint(-6, 7, (h, w, channels))).clip(0, 255).astype(np.uint8)


def png_header_only(path, width: int, height: int) -> None:
    """A PNG whose header claims ``width x height`` with no pixel data (a decompression-bomb stand-in)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def mixed_items(image_dir, n: int = 12) -> list:
    """``n`` good items of every kind (text-only, human image, assistant image, implicit, multi) + images."""
    from PIL import Image

    image_dir = Path(image_dir)
    image_dir.mkdir(parents=True, exist_ok=True)
    shapes = [(200, 330), (300, 300), (150, 420), (260, 180)]
    paths = []
    for k, (h, w) in enumerate(shapes):
        p = image_dir / f"img{k}.png"
        Image.fromarray(smooth_image(h, w, k)).save(p)
        paths.append(str(p))
    kinds = [
        lambda i: {
            "conversations": [
                {"from": "human", "value": f"Question {i}?"},
                {"from": "gpt", "value": f"Answer {i}."},
            ]
        },
        lambda i: {
            "conversations": [
                {"from": "human", "value": f"<|image|> What is {i}?"},
                {"from": "gpt", "value": "A pattern."},
            ],
            "image": paths[i % 4],
        },
        lambda i: {
            "conversations": [
                {"from": "human", "value": f"Draw {i}"},
                {"from": "assistant", "value": "<|image|>"},
            ],
            "image": [paths[(i + 1) % 4]],
        },
        lambda i: {
            "conversations": [{"from": "human", "value": "Compare."}, {"from": "gpt", "value": "Same."}],
            "image": [paths[i % 4], paths[(i + 2) % 4]],
        },
    ]
    return [dict(kinds[i % 4](i), id=f"item-{i}") for i in range(n)]


def tiny_train_flags(model_dir: str, out_dir, seq_len: int) -> list:
    """The trainer flags the 2-process CPU training tests share (tiny model, ZeRO-3 config,
    micro-batch 2, a high learning rate, one warm-up step, a log line per step)."""
    root = Path(__file__).resolve().parent.parent
    return [
        "--deepspeed_config",
        str(root / "ds_configs" / "zero3.json"),
        "--init_from",
        model_dir,
        "--output_dir",
        str(out_dir),
        "--micro_batch_size",
        "2",
        "--max_seq_len",
        str(seq_len),
        "--lr",
        "3e-3",
        "--warmup_steps",
        "1",
        "--log_every",
        "1",
        "--num_workers",
        "1",
        "--progress_bar",
        "never",
    ]


def torchrun_cmd(nproc: int, *args: str) -> list:
    """``torchrun --standalone --nproc_per_node N`` (as ``python -m torch.distributed.run``) + args."""
    import sys

    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]


def fp32_zero3_config(path) -> str:
    """The shipped ZeRO-3 JSON with bf16 off, written to ``path``: runs compared across layouts
    then differ only by fp32 reduction order, not by bf16 rounding of differently shaped sums."""
    import json

    root = Path(__file__).resolve().parent.parent
    ds = json.loads((root / "lumina" / "ds_configs" / "zero3.json").read_text())
    ds["bf16"] = {"enabled": False}
    Path(path).write_text(json.dumps(ds, indent=1))
    return str(path)


def write_uniform_mixture(root, vocab: int, num_samples: int = 12, seq_len: int = 16) -> str:
    """Two datasets ('a', 'b') of ``num_samples`` random samples, every one ``seq_len`` tokens with
    its first 4 unsupervised, mixed 50/50 in a YAML; returns the YAML's path.

    Equal lengths and equal supervised counts make every micro-batch of a given size hold the same
    number of supervised tokens, so the loss of a global batch (mean of per-micro-batch means) does
    not depend on how the batch is split over ranks and accumulation steps."""
    import numpy as np

    from wds_tools.merge import merge
    from wds_tools.writer import ShardWriter

    root = Path(root)
    for name, seed in (("a", 1), ("b", 2)):
        rng = np.random.default_rng(seed)
        with ShardWriter(str(root / name), vocab_size=vocab, max_samples=4) as w:
            for i in range(num_samples):
                ids = rng.integers(5, vocab, seq_len)
                labels = ids.copy()
                labels[:4] = -100
                w.write(f"{name}-{i:04d}", ids, labels=labels)
        merge(str(root / name))
    path = root / "mix.yaml"
    path.write_text(
        "seed: 0\nweight_by: samples\ndatasets:\n"
        "  - {name: a, manifest: a/index.json, weight: 0.5}\n"
        "  - {name: b, manifest: b/index.json, weight: 0.5}\n"
    )
    return str(path)


def rank_pid(launcher_pid: int, rank: int):
    """The pid of ``rank`` among the children of a ``torchrun`` launcher (None if not there yet):
    the process a SIGKILL test ends, as a node failure would."""
    import os

    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            env = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == launcher_pid and f"RANK={rank}".encode() in env:
            return int(entry)
    return None


def tiny_tokenizer_and_model(base) -> tuple:
    """``(tokenizer dir, model dir, vocab size)`` of the small random Chameleon the trainer
    tests use (32 wide, 2 heads, 64 image tokens), built under ``base``."""
    from transformers import AutoConfig

    from lumina.tiny import build_tiny_chameleon, build_tiny_tokenizer

    tok = build_tiny_tokenizer(str(Path(base) / "tokenizer"), num_image_tokens=64, bpe_vocab_size=256)
    model = build_tiny_chameleon(
        str(Path(base) / "model"),
        tok,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    return tok, model, AutoConfig.from_pretrained(model).vocab_size


def launcher_env() -> dict:
    """The environment of a test's launcher (``torchrun``, ``python -m lumina.train``): one
    OpenMP thread per process, the repository and ``tests/`` importable, and DeepSpeed's compiled
    ops cached where ``TORCH_EXTENSIONS_DIR`` says (default ``~/.cache/torch_extensions``, shared
    by every test run on the machine)."""
    import os

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(root), str(root / "tests"), env.get("PYTHONPATH", "")]),
        TORCH_EXTENSIONS_DIR=env.get(
            "TORCH_EXTENSIONS_DIR", os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions")
        ),
    )
    return env


def run_in_session(cmd, *, cwd, env, timeout: int = 300):
    """Run a launcher (``torchrun``, ``python -m lumina.train``) in its own session and return the
    ``CompletedProcess``; on a timeout end its whole process group (the ranks and their loader
    workers outlive a killed ``torchrun``). A non-zero exit fails with the output's tails."""
    import os
    import signal
    import subprocess

    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out[-3000:]}\n{err[-5000:]}"
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)

"""DeepSpeed checkpoints of the trainer: where they live, what they hold, which to resume.

Layout under ``--output_dir``::

    checkpoints/step_00000100/   DeepSpeed's sharded ZeRO-3 checkpoint (fp32 master weights,
                                 optimizer, LR scheduler) plus the client state below
    checkpoints/latest           DeepSpeed's pointer to the newest tag
    model/config.json            the Chameleon config (for the export)
    tokenizer/                   the tokenizer, copied at start (for the export)
    trainer_meta.json            the TrainConfig the run was started with

The client state (saved by rank 0 in the model-states file) holds the step, every rank's loader
state (gathered: each rank's loader has its own position) and the cumulative per-dataset counts.
"""

from __future__ import annotations

import os
import re
import shutil
from typing import Any, Optional

__all__ = [
    "CLIENT_STATE_VERSION",
    "checkpoint_root",
    "find_latest",
    "list_checkpoints",
    "prune_checkpoints",
    "resolve_resume",
    "tag_for_step",
]

CLIENT_STATE_VERSION = 1
_TAG_RE = re.compile(r"^step_(\d+)$")


def checkpoint_root(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(root: str) -> list[tuple[int, str]]:
    """``(step, tag)`` of the complete-looking checkpoint folders under ``root``, oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _TAG_RE.match(name)
        if m and os.path.isdir(os.path.join(root, name)) and os.listdir(os.path.join(root, name)):
            found.append((int(m.group(1)), name))
    return sorted(found)


def find_latest(root: str) -> Optional[str]:
    """The tag DeepSpeed's ``latest`` file names, if that folder exists; else the highest step."""
    latest = os.path.join(root, "latest")
    if os.path.isfile(latest):
        with open(latest) as fh:
            tag = fh.read().strip()
        if tag and os.path.isdir(os.path.join(root, tag)):
            return tag
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def resolve_resume(resume: str, output_dir: str) -> Optional[tuple[str, str]]:
    """``(load_dir, tag)`` to resume from, or None to start fresh.

    ``resume`` is 'auto' (the latest under ``output_dir``), 'never' (refuse existing ones) or a
    checkpoint tag folder.
    """
    from lumina.train_config import ConfigError

    root = checkpoint_root(output_dir)
    if resume == "auto":
        tag = find_latest(root)
        return (root, tag) if tag else None
    if resume == "never":
        if find_latest(root):
            raise ConfigError(f"--resume never, but {root} holds checkpoints: use a new "
                              "--output_dir or --resume auto")
        return None
    path = os.path.normpath(resume)
    if os.path.isfile(os.path.join(path, "latest")):  # a checkpoints root
        tag = find_latest(path)
        if tag:
            return path, tag
    if not os.path.isdir(path):
        raise ConfigError(f"--resume {resume!r}: not 'auto', 'never' or a checkpoint folder")
    return os.path.dirname(path), os.path.basename(path)


def prune_checkpoints(root: str, keep_last: int) -> list[str]:
    """Delete all but the newest ``keep_last`` checkpoints (0 keeps all); returns deleted tags."""
    if keep_last <= 0:
        return []
    found = list_checkpoints(root)
    doomed = [tag for _, tag in found[:-keep_last]]
    for tag in doomed:
        shutil.rmtree(os.path.join(root, tag), ignore_errors=True)
    return doomed


def copy_tokenizer(candidates: list[Optional[str]], dest: str) -> Optional[str]:
    """Copy the first candidate folder that holds a tokenizer to ``dest``; returns it or None."""
    markers = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    for cand in candidates:
        if cand and os.path.isdir(cand) and any(os.path.isfile(os.path.join(cand, m)) for m in markers):
            os.makedirs(dest, exist_ok=True)
            for name in os.listdir(cand):
                src = os.path.join(cand, name)
                if os.path.isfile(src) and ("token" in name or name.endswith((".model", ".txt"))
                                            or name == "special_tokens_map.json"):
                    shutil.copy2(src, os.path.join(dest, name))
            return cand
    return None


def client_state(step: int, loader_states: list[Any], data_counts: dict, world_size: int) -> dict:
    return {
        "version": CLIENT_STATE_VERSION,
        "step": step,
        "world_size": world_size,
        "loader_states": loader_states,
        "data_counts": data_counts,
    }

"""DeepSpeed checkpoints of the trainer: where they live, what they hold, which to resume.

Layout under ``--output_dir``::

    checkpoints/step_00000100/   DeepSpeed's sharded ZeRO-3 checkpoint (fp32 master weights,
                                 optimizer, LR scheduler) plus the client state below
    checkpoints/step_00000100/lumina_complete.json
                                 the completion marker: written by rank 0 after every rank's
                                 files are saved (barrier), listing each file and its size
    checkpoints/lumina_markers.json  says this root's checkpoints carry completion markers
    checkpoints/latest           DeepSpeed's pointer to the newest tag (not trusted, see below)
    model/config.json            the Chameleon config (for the export)
    tokenizer/                   the tokenizer, copied at start (for the export)
    trainer_meta.json            the TrainConfig the run was started with

The client state (saved by rank 0 in the model-states file) holds the step, every rank's loader
state (gathered: each rank's loader has its own position) and the cumulative per-dataset counts.

Which checkpoint is the latest: DeepSpeed's ``latest`` file is not a commit point (rank 0 writes
it after its own files; a rank killed inside a save leaves a tag folder with torn or missing
files, and a kill in the first save leaves no ``latest`` at all, where the old highest-step
fallback picked the torn folder and every rerun failed loading it). So the trainer marks a tag
complete itself (:func:`mark_complete`, by rank 0 after a barrier that follows every rank's
save) and, in a root that uses markers, only tags whose marker lists files that are all present
with their sizes are candidates (:func:`is_complete`); ``latest`` is ignored there. Roots written
before markers (no ``lumina_markers.json`` and no marker in any tag) keep the old rule:
``latest``, else the highest non-empty step folder.

Crash drills (``tests/test_reliability_crash.py``) inject their faults from outside: they wrap
the trainer's save step in a test-only entry point; nothing here knows about them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any, Optional

from wds_tools.contract import write_json_atomic

__all__ = [
    "CLIENT_STATE_VERSION",
    "check_client_state",
    "checkpoint_root",
    "client_state",
    "find_latest",
    "is_complete",
    "list_checkpoints",
    "mark_complete",
    "unmark",
    "use_markers",
    "prune_checkpoints",
    "resolve_resume",
    "tag_for_step",
]

CLIENT_STATE_VERSION = 1
MARKER_NAME = "lumina_complete.json"
ROOT_MARKER_NAME = "lumina_markers.json"
_TAG_RE = re.compile(r"^step_(\d+)$")


def checkpoint_root(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def use_markers(root: str) -> None:
    """Declare that ``root``'s checkpoints carry completion markers (a fresh run, before saving)."""
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, ROOT_MARKER_NAME)
    if not os.path.isfile(path):
        write_json_atomic(path, {"marker": MARKER_NAME, "version": 1}, indent=1)


def _uses_markers(root: str, tags: list[str]) -> bool:
    return os.path.isfile(os.path.join(root, ROOT_MARKER_NAME)) or any(
        os.path.isfile(os.path.join(root, t, MARKER_NAME)) for t in tags
    )


def unmark(root: str, tag: str) -> None:
    """Remove ``tag``'s completion marker (before saving over it, so a crash leaves it unmarked)."""
    try:
        os.remove(os.path.join(root, tag, MARKER_NAME))
    except FileNotFoundError:
        pass


def mark_complete(root: str, tag: str, step: int, world_size: int) -> dict:
    """Write ``tag``'s completion marker: every file below it with its size (rank 0, after every
    rank's files are written)."""
    folder = os.path.join(root, tag)
    files = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            if name == MARKER_NAME or name.endswith(".tmp"):
                continue
            full = os.path.join(dirpath, name)
            files[os.path.relpath(full, folder)] = os.path.getsize(full)
    doc = {"tag": tag, "step": step, "world_size": world_size, "files": dict(sorted(files.items()))}
    write_json_atomic(os.path.join(folder, MARKER_NAME), doc, indent=1)
    return doc


def is_complete(root: str, tag: str) -> bool:
    """Whether ``tag`` has a readable marker whose files are all there, with their sizes."""
    folder = os.path.join(root, tag)
    try:
        with open(os.path.join(folder, MARKER_NAME)) as fh:
            doc = json.load(fh)
        files = doc["files"]
        if doc.get("tag") != tag or not files:
            return False
        return all(os.path.getsize(os.path.join(folder, rel)) == size for rel, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _tag_folders(root: str) -> list[tuple[int, str]]:
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _TAG_RE.match(name)
        if m and os.path.isdir(os.path.join(root, name)):
            found.append((int(m.group(1)), name))
    return sorted(found)


def list_checkpoints(root: str) -> list[tuple[int, str]]:
    """``(step, tag)`` of the complete checkpoints under ``root``, oldest first: marked and
    verified ones in a root that uses markers, else (older roots) the non-empty tag folders."""
    folders = _tag_folders(root)
    if _uses_markers(root, [t for _, t in folders]):
        return [(s, t) for s, t in folders if is_complete(root, t)]
    return [(s, t) for s, t in folders if os.listdir(os.path.join(root, t))]


def find_latest(root: str) -> Optional[str]:
    """The newest complete checkpoint's tag, or None.

    In a root that uses markers, the highest-step verified tag (DeepSpeed's ``latest`` may name a
    half-written one). In an older root, the tag ``latest`` names if that folder exists, else the
    highest step.
    """
    folders = _tag_folders(root)
    if _uses_markers(root, [t for _, t in folders]):
        found = list_checkpoints(root)
        return found[-1][1] if found else None
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
            raise ConfigError(
                f"--resume never, but {root} holds checkpoints: use a new --output_dir or --resume auto"
            )
        return None
    path = os.path.normpath(resume)
    if any(os.path.isfile(os.path.join(path, f)) for f in ("latest", ROOT_MARKER_NAME)):  # a root
        tag = find_latest(path)
        if tag:
            return path, tag
    if not os.path.isdir(path):
        raise ConfigError(f"--resume {resume!r}: not 'auto', 'never' or a checkpoint folder")
    parent, tag = os.path.dirname(path), os.path.basename(path)
    if _uses_markers(parent, [tag]) and not is_complete(parent, tag):
        raise ConfigError(
            f"--resume {resume!r}: an incomplete checkpoint (no valid {MARKER_NAME}: "
            "its save was interrupted); pick an older one or --resume auto"
        )
    return parent, tag


def prune_checkpoints(root: str, keep_last: int) -> list[str]:
    """Delete all but the newest ``keep_last`` complete checkpoints (0 keeps all) and, in a root
    started with markers, unmarked tag folders older than the newest complete one (crash
    leftovers); returns the deleted tags."""
    if keep_last <= 0:
        return []
    found = list_checkpoints(root)
    doomed = [tag for _, tag in found[:-keep_last]]
    if found and os.path.isfile(os.path.join(root, ROOT_MARKER_NAME)):  # all tags marked here
        complete = {t for _, t in found}
        doomed += [t for s, t in _tag_folders(root) if s < found[-1][0] and t not in complete]
    for tag in doomed:
        shutil.rmtree(os.path.join(root, tag), ignore_errors=True)
    return sorted(doomed)


def copy_tokenizer(candidates: list[Optional[str]], dest: str) -> Optional[str]:
    """Copy the first candidate folder that holds a tokenizer to ``dest``; returns it or None."""
    markers = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    for cand in candidates:
        if cand and os.path.isdir(cand) and any(os.path.isfile(os.path.join(cand, m)) for m in markers):
            os.makedirs(dest, exist_ok=True)
            for name in os.listdir(cand):
                src = os.path.join(cand, name)
                if os.path.isfile(src) and (
                    "token" in name or name.endswith((".model", ".txt")) or name == "special_tokens_map.json"
                ):
                    shutil.copy2(src, os.path.join(dest, name))
            return cand
    return None


def client_state(step: int, loader_states: list[Any], data_counts: dict, world_size: int) -> dict:
    """What the trainer adds to a DeepSpeed checkpoint (rank 0 writes it): the step, every rank's
    loader state (rank order), the cumulative per-dataset counts and the world size."""
    return {
        "version": CLIENT_STATE_VERSION,
        "step": step,
        "world_size": world_size,
        "loader_states": loader_states,
        "data_counts": data_counts,
    }


def check_client_state(state: Any, where: str, world_size: int) -> dict:
    """``state`` (a loaded client state) if this trainer can continue from it, else a one-line
    ConfigError naming the checkpoint ``where`` and both versions (or both world sizes)."""
    from lumina.train_config import ConfigError

    version = state.get("version") if isinstance(state, dict) else None
    if version != CLIENT_STATE_VERSION:
        raise ConfigError(
            f"the checkpoint {where} holds trainer state version {version!r}; this "
            f"trainer reads version {CLIENT_STATE_VERSION}"
        )
    if state.get("world_size") != world_size:
        raise ConfigError(
            f"the checkpoint {where} was written by {state.get('world_size')} ranks, "
            f"this run has {world_size}: the loader positions are per rank"
        )
    return state

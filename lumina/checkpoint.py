"""DeepSpeed checkpoints of the trainer: where they live, what they hold, which to resume.

Layout under ``--output_dir``::

    checkpoints/step_00000100/   DeepSpeed's sharded ZeRO-3 checkpoint (fp32 master weights,
                                 optimizer, LR scheduler) plus the client state below
    checkpoints/step_00000100/lumina_complete.json
                                 the completion marker: written by rank 0 after every rank's
                                 files are saved (barrier), listing each file and its size,
                                 the layout and the optimizer groups' settings
    checkpoints/universal/step_00000100/
                                 DeepSpeed's universal form of the tag, made by a resume under
                                 another number of processes (deleted with the tag)
    checkpoints/lumina_markers.json  says this root's checkpoints carry completion markers
    checkpoints/latest           DeepSpeed's pointer to the newest tag (not trusted, see below)
    model/config.json            the Chameleon config (for the export)
    tokenizer/                   the tokenizer, copied at start (for the export)
    trainer_meta.json            the TrainConfig the run was started with

The client state (saved by rank 0 in the model-states file) holds the step, every rank's loader
state (gathered: each rank's loader has its own position), the cumulative per-dataset counts and
the layout (processes, micro-batch, accumulation); the completion marker repeats the layout, so
a resume reads it before building the engine, without unpickling anything.

Resuming under another layout: ZeRO-3 shards the fp32 master weights and Adam moments by the
number of processes, so a checkpoint written by N processes loads only under N. When the number
changes, rank 0 converts the tag once with DeepSpeed's ``ds_to_universal`` into
``checkpoints/universal/TAG/`` (atomic: written beside it, renamed when complete; reused when
present) and the engine loads it with ``"checkpoint": {"load_universal": true}``
(:func:`convert_to_universal`). Micro-batch or accumulation changes alone keep the shards as
they are.

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

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time
from typing import Any, Optional

from wds_tools.contract import write_json_atomic

__all__ = [
    "CLIENT_STATE_VERSION",
    "check_client_state",
    "checkpoint_root",
    "clear_tag",
    "client_state",
    "convert_to_universal",
    "layout_changes",
    "saved_layout",
    "saved_optimizer_groups",
    "train_layout",
    "universal_path",
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
UNIVERSAL_DIR = "universal"
UNIVERSAL_MARKER_NAME = "lumina_universal.json"
# The layout a checkpoint records, with the words the resume log line uses for each entry.
LAYOUT_KEYS = {
    "world_size": "processes",
    "micro_batch_size": "micro-batch",
    "grad_accum": "grad accumulation",
}
_TAG_RE = re.compile(r"^step_(\d+)$")
_MODEL_STATES = "zero_pp_rank_*_mp_rank_00_model_states.pt"


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


def clear_tag(root: str, tag: str) -> None:
    """Remove ``tag`` and its universal conversion before saving over it (rank 0): a crash leaves
    it unmarked, and no shard of an earlier save under more processes stays beside the new ones
    (they would be listed as complete and mixed into a later load or conversion)."""
    unmark(root, tag)
    for folder in (os.path.join(root, tag), universal_path(root, tag)):
        shutil.rmtree(folder, ignore_errors=True)
    _drop_empty_universal(root)


def mark_complete(
    root: str,
    tag: str,
    step: int,
    world_size: int,
    layout: Optional[dict] = None,
    optimizer_groups: Optional[list[dict]] = None,
) -> dict:
    """Write ``tag``'s completion marker: every file below it with its size, the run's ``layout``
    and the optimizer's per-group settings (rank 0, after every rank's files are written)."""
    folder = os.path.join(root, tag)
    files = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            if name == MARKER_NAME or name.endswith(".tmp"):
                continue
            full = os.path.join(dirpath, name)
            files[os.path.relpath(full, folder)] = os.path.getsize(full)
    doc: dict = {"tag": tag, "step": step, "world_size": world_size}
    if layout is not None:
        doc["layout"] = layout
    if optimizer_groups is not None:
        doc["optimizer_groups"] = optimizer_groups
    doc["files"] = dict(sorted(files.items()))
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
        shutil.rmtree(universal_path(root, tag), ignore_errors=True)
    _drop_empty_universal(root)
    return sorted(doomed)


def _drop_empty_universal(root: str) -> None:
    """Remove ``universal/`` once no conversion is left in it (only the tool's pointer file)."""
    folder = os.path.join(root, UNIVERSAL_DIR)
    if os.path.isdir(folder) and not any(os.path.isdir(os.path.join(folder, n)) for n in os.listdir(folder)):
        shutil.rmtree(folder, ignore_errors=True)


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


def train_layout(world_size: int, micro_batch_size: int, grad_accum: int) -> dict:
    """The layout a checkpoint records: what may differ when it is resumed."""
    return {"world_size": world_size, "micro_batch_size": micro_batch_size, "grad_accum": grad_accum}


def saved_layout(root: str, tag: str) -> dict:
    """The layout ``tag`` was written under, from its completion marker (no unpickling).

    Markers written before layouts were recorded give the world size only (micro-batch and
    accumulation None: unknown); a tag without a marker counts its model-state files.
    """
    try:
        with open(os.path.join(root, tag, MARKER_NAME)) as fh:
            doc = json.load(fh)
    except (OSError, ValueError):
        doc = {}
    layout = doc.get("layout") if isinstance(doc, dict) else None
    if isinstance(layout, dict):
        return {key: layout.get(key) for key in LAYOUT_KEYS}
    world = doc.get("world_size") if isinstance(doc, dict) else None
    if not isinstance(world, int):
        world = len(glob.glob(os.path.join(root, tag, _MODEL_STATES))) or None
    return {"world_size": world, "micro_batch_size": None, "grad_accum": None}


def saved_optimizer_groups(root: str, tag: str) -> Optional[list[dict]]:
    """The optimizer's per-group settings ``tag``'s marker recorded (weight decay, betas...), or
    None. DeepSpeed 0.19's universal load of ZeRO-3 gives every group the first group's settings,
    so the trainer puts these back after it (norms and biases would decay otherwise)."""
    try:
        with open(os.path.join(root, tag, MARKER_NAME)) as fh:
            groups = json.load(fh).get("optimizer_groups")
    except (OSError, ValueError, AttributeError):
        return None
    return groups if isinstance(groups, list) else None


def layout_changes(saved: dict, now: dict) -> list[str]:
    """What differs between a checkpoint's layout and this run's, in words (``processes 2 -> 1``);
    entries the checkpoint does not know (None) are not compared."""
    return [
        f"{words} {saved[key]} -> {now[key]}"
        for key, words in LAYOUT_KEYS.items()
        if saved.get(key) is not None and saved[key] != now[key]
    ]


def universal_path(root: str, tag: str) -> str:
    """Where :func:`convert_to_universal` puts ``tag``'s universal checkpoint (a sibling folder)."""
    return os.path.join(root, UNIVERSAL_DIR, tag)


def convert_to_universal(root: str, tag: str) -> tuple[str, float]:
    """``tag`` as DeepSpeed's universal checkpoint (``ds_to_universal``), for a load under another
    number of processes: ``(folder, seconds)``; 0 seconds when an earlier conversion is reused.

    One process (rank 0) calls it. The tool writes into a temporary folder beside the target,
    which is renamed once complete (with a marker naming the source), so a crash mid-conversion
    leaves nothing that looks converted. Runs in a child process: the tool prints progress and
    loads every shard, and its memory goes back when it exits. A failure is a one-line ConfigError
    with the tool's last error line.
    """
    from lumina.train_config import ConfigError

    src, dest = os.path.join(root, tag), universal_path(root, tag)
    if _converted(dest, tag):
        return dest, 0.0
    parent = os.path.dirname(dest)
    os.makedirs(parent, exist_ok=True)
    for stale in glob.glob(f"{dest}.tmp*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = f"{dest}.tmp{os.getpid()}"
    t0 = time.perf_counter()
    cmd = [
        sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
        "--input_folder", src, "--output_folder", tmp,
        "--num_extract_workers", "1", "--num_merge_workers", "1",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TQDM_DISABLE="1"))
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        lines = [x.strip() for x in (proc.stderr + proc.stdout).splitlines() if x.strip()]
        errors = [x for x in lines if "Error" in x or "error" in x] or lines or ["(no output)"]
        raise ConfigError(
            f"--resume: DeepSpeed's ds_to_universal could not convert {src} for a load under "
            f"another number of processes (exit {proc.returncode}): {errors[-1]}"
        )
    write_json_atomic(os.path.join(tmp, UNIVERSAL_MARKER_NAME), {"source": tag, "version": 1}, indent=1)
    shutil.rmtree(dest, ignore_errors=True)
    os.rename(tmp, dest)
    # The tool points ``latest_universal`` (beside its output) at the temporary name: name the tag.
    with open(os.path.join(parent, "latest_universal"), "w") as fh:
        fh.write(tag)
    return dest, time.perf_counter() - t0


def _converted(dest: str, tag: str) -> bool:
    try:
        with open(os.path.join(dest, UNIVERSAL_MARKER_NAME)) as fh:
            return json.load(fh).get("source") == tag
    except (OSError, ValueError, AttributeError):
        return False


def client_state(
    step: int,
    loader_states: list[Any],
    data_counts: dict,
    world_size: int,
    layout: Optional[dict] = None,
) -> dict:
    """What the trainer adds to a DeepSpeed checkpoint (rank 0 writes it): the step, every rank's
    loader state (rank order), the cumulative per-dataset counts, the world size and the layout
    (:func:`train_layout`)."""
    state = {
        "version": CLIENT_STATE_VERSION,
        "step": step,
        "world_size": world_size,
        "loader_states": loader_states,
        "data_counts": data_counts,
    }
    if layout is not None:
        state["layout"] = layout
    return state


def check_client_state(state: Any, where: str, world_size: Optional[int]) -> dict:
    """``state`` (a loaded client state) if this trainer can continue from it, else a one-line
    ConfigError naming the checkpoint ``where`` and both versions (or both world sizes).

    ``world_size`` None accepts any world size (the trainer: the universal conversion and the
    loader take care of another layout); a number refuses a state written by another one.
    """
    from lumina.train_config import ConfigError

    version = state.get("version") if isinstance(state, dict) else None
    if version != CLIENT_STATE_VERSION:
        raise ConfigError(
            f"the checkpoint {where} holds trainer state version {version!r}; this "
            f"trainer reads version {CLIENT_STATE_VERSION}"
        )
    if world_size is not None and state.get("world_size") != world_size:
        raise ConfigError(
            f"the checkpoint {where} was written by {state.get('world_size')} ranks, "
            f"this run has {world_size}: the loader positions are per rank"
        )
    return state

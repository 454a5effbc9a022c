"""``lumina view SOURCE``: ``wds-tools view`` with Lumina-mGPT's image renderer plugged in.

``--vq FOLDER`` is what :func:`lumina.render.load_renderer` reads (``vqgan.yaml``, the weights
and the vocabulary): Lumina-mGPT's ``ckpts/chameleon/tokenizer/`` (the default, when it exists)
or a ``lumina make-tiny`` output folder. ``--tokenizer`` defaults to that folder's
``text_tokenizer.json`` (or ``tokenizer.json``). Every other flag is ``wds-tools view``'s (see
``docs/inspect.md``); the same thing spelled with the generic flags is::

    wds-tools view SOURCE --tokenizer DIR \\
        --renderer lumina.render:load_renderer --renderer-arg FOLDER
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Optional

__all__ = ["add_arguments", "run", "main", "renderer_from_args"]

DEFAULT_VQ = "ckpts/chameleon/tokenizer"
_VQ_SUBFOLDERS = ("", "vq", "tokenizer")
_TOKENIZER_FILES = ("text_tokenizer.json", "tokenizer.json")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from wds_tools.view import add_arguments as view_arguments

    view_arguments(p)
    p.add_argument(
        "--vq",
        metavar="FOLDER",
        help="VQGAN folder (vqgan.yaml + vqgan.ckpt/.safetensors + vocabulary): "
        f"Lumina-mGPT's {DEFAULT_VQ} (default, when it exists) or a make-tiny "
        "output folder; without one, image blocks are drawn as placeholders",
    )
    p.add_argument("--device", help="decoder device (default: cuda if available, else cpu)")


def _vq_folder(path: str) -> Optional[str]:
    """The folder under ``path`` (itself, ``vq/`` or ``tokenizer/``) holding ``vqgan.yaml``."""
    for sub in _VQ_SUBFOLDERS:
        folder = os.path.join(path, sub) if sub else path
        if os.path.isfile(os.path.join(folder, "vqgan.yaml")):
            return folder
    return None


def renderer_from_args(args: argparse.Namespace) -> Any:
    """The Chameleon renderer ``--vq`` names (None without one); fills in ``--tokenizer``."""
    if args.vq and args.renderer:
        raise ValueError("give --vq or --renderer, not both")
    if args.renderer:
        return None  # the generic flags: wds-tools view loads it
    path = args.vq or (DEFAULT_VQ if os.path.isdir(DEFAULT_VQ) else None)
    if path is None:
        print(
            f"lumina view: no --vq (and no {DEFAULT_VQ}): image blocks are drawn as placeholders",
            file=sys.stderr,
        )
        return None
    folder = _vq_folder(path)
    if folder is None:
        raise ValueError(f"--vq {path}: no vqgan.yaml there (nor in vq/ or tokenizer/ below it)")
    if not args.tokenizer:
        args.tokenizer = next(
            (os.path.join(folder, f) for f in _TOKENIZER_FILES if os.path.isfile(os.path.join(folder, f))),
            None,
        )
    from lumina.render import load_renderer

    return load_renderer(folder, device=args.device)


def run(args: argparse.Namespace) -> int:
    from wds_tools.view import run as view_run

    try:
        return view_run(args, renderer=renderer_from_args(args))
    except (ValueError, OSError) as e:
        print(f"lumina view: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="lumina view", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

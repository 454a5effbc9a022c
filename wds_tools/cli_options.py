"""Command-line flags shared by the ``wds-tools`` subcommands that read data (stream, verify,
view, ...): the shard cache and the transport's safety switches, mapped to ``IOOptions``."""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Any, Dict, Optional, Tuple, Union

from .config import parse_bytes
from .io import DEFAULT, IOOptions

__all__ = ["add_io_arguments", "io_options_from_args", "cache_io_options"]


def add_io_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("reading remote data")
    g.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="cache remote shards whole in this local folder (one per node, shared "
        "by its processes); overrides a data config's cache",
    )
    g.add_argument(
        "--cache-max-bytes",
        metavar="SIZE",
        default=None,
        help="size limit of --cache-dir, e.g. 500G (default 64G); least recently used shards are evicted",
    )
    g.add_argument(
        "--allow-pipe", action="store_true", help="let pipe:COMMAND URLs run shell commands (off by default)"
    )


def io_options_from_args(args: argparse.Namespace, base: IOOptions = DEFAULT) -> IOOptions:
    """``IOOptions`` from the flags of :func:`add_io_arguments` (missing flags: ``base``)."""
    return cache_io_options(
        getattr(args, "cache_dir", None),
        getattr(args, "cache_max_bytes", None),
        allow_pipe=getattr(args, "allow_pipe", False),
        base=base,
    )


def cache_io_options(
    cache_dir: Optional[str],
    cache_max_bytes: Optional[Union[str, int]],
    *,
    allow_pipe: bool = False,
    base: IOOptions = DEFAULT,
    flags: Tuple[str, str] = ("--cache-dir", "--cache-max-bytes"),
) -> IOOptions:
    """``base`` with a shard cache (``cache_max_bytes`` like ``500G``; default 64G) and
    ``allow_pipe``; ``flags`` names the two settings in error lines (the trainer spells them
    with underscores)."""
    kw: Dict[str, Any] = {}
    if cache_max_bytes is not None and not cache_dir:
        raise ValueError(f"{flags[1]} needs {flags[0]}")
    if cache_dir:
        kw["cache_dir"] = cache_dir
        if cache_max_bytes is not None:
            kw["cache_max_bytes"] = parse_bytes(cache_max_bytes, flags[1])
    if allow_pipe:
        kw["allow_pipe"] = True
    return replace(base, **kw) if kw else base

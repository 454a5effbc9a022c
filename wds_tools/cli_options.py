"""Command-line flags shared by the ``wds-tools`` subcommands that read data (stream, verify,
view, ...): the shard cache and the transport's safety switches, mapped to ``IOOptions``."""

from __future__ import annotations

import argparse

from .config import parse_bytes
from .io import DEFAULT, IOOptions

__all__ = ["add_io_arguments", "io_options_from_args"]


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
    kw = {}
    cache_dir = getattr(args, "cache_dir", None)
    max_bytes = getattr(args, "cache_max_bytes", None)
    if max_bytes is not None and not cache_dir:
        raise ValueError("--cache-max-bytes needs --cache-dir")
    if cache_dir:
        kw["cache_dir"] = cache_dir
        if max_bytes is not None:
            kw["cache_max_bytes"] = parse_bytes(max_bytes, "--cache-max-bytes")
    if getattr(args, "allow_pipe", False):
        kw["allow_pipe"] = True
    return IOOptions(**{**vars(base), **kw}) if kw else base

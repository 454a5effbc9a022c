"""``wds-tools view PATH_OR_URL``: a local web app to look at a dataset or a data mixture.

The source is a manifest (or a folder holding ``index.json``), a shard index, a shard (local,
``https://`` or ``s3://``) or a data config YAML. Pages: an overview per dataset (exact counts
from the manifest, histograms from a bounded sample of shards), a sample list with paging and
search, a sample page (decoded conversation with ``--tokenizer``, trained vs masked tokens,
image blocks drawn by a ``--renderer``), and for a data config the mixture: weights and target
vs realized shares over steps (the numbers of ``wds-tools mix``).

Model-agnostic: pictures come from a renderer, ``--renderer MODULE:CALLABLE [--renderer-arg
STR]``, whose ``render(input_ids, block) -> PNG bytes`` draws one image block; without one, a
box of the block's grid size stands in. Binds to 127.0.0.1 unless ``--host`` says otherwise.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, List, Optional

from ..cli_options import add_io_arguments, io_options_from_args

__all__ = ["add_arguments", "run", "main", "build_app"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "path",
        help="manifest (index.json or its folder), shard index (.idx.json), "
        "shard (.tar) or data config (.yaml); local, http(s):// or s3://",
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=0, help="port (default 0: pick a free one)")
    p.add_argument(
        "--tokenizer",
        help="tokenizer folder (or tokenizer.json) to decode tokens "
        "to text; without it the page shows token ids",
    )
    p.add_argument(
        "--renderer",
        metavar="MODULE:CALLABLE",
        help="image renderer factory, e.g. lumina.render:load_renderer; called once "
        "(with --renderer-arg when given) and returning an object with "
        "render(input_ids, block) -> PNG bytes",
    )
    p.add_argument("--renderer-arg", metavar="STR", help="the argument passed to --renderer")
    p.add_argument("--page-size", type=int, default=50, help="rows per sample-list page")
    p.add_argument(
        "--stats-shards",
        type=int,
        default=16,
        help="shards read for the overview's histograms (evenly spaced; default 16)",
    )
    p.add_argument(
        "--mix-samples",
        type=int,
        default=4000,
        help="samples of reader 0 simulated for a data config's mixture plot (as wds-tools mix --samples)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="micro-batch size of the mixture dry run (steps = samples / this)",
    )
    p.add_argument("--open", action="store_true", help="open the URL in a web browser")
    add_io_arguments(p)


def build_app(args: argparse.Namespace, renderer: Any = None):
    """The :class:`~wds_tools.view.server.App` the parsed command line describes (``renderer``:
    an already built renderer object, used instead of ``--renderer``)."""
    from .data import open_source
    from .server import App, load_renderer

    for name in ("page_size", "stats_shards", "mix_samples", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 <= args.port <= 65535:
        raise ValueError("--port must be 0..65535")
    opts = io_options_from_args(args)
    source = open_source(args.path, opts, stats_shards=args.stats_shards)
    if args.renderer_arg is not None and not args.renderer:
        raise ValueError("--renderer-arg needs --renderer")
    if renderer is None and args.renderer:
        renderer = load_renderer(args.renderer, args.renderer_arg)
    return App(
        source,
        tokenizer=args.tokenizer,
        renderer=renderer,
        page_size=args.page_size,
        mix_samples=args.mix_samples,
        batch_size=args.batch_size,
    )


def run(args: argparse.Namespace, renderer: Any = None) -> int:
    """Serve until Ctrl-C (``renderer``: see :func:`build_app`)."""
    from .. import io as wio
    from .server import make_server

    app = build_app(args, renderer)
    try:
        server = make_server(app, args.host, args.port)
    except OSError as e:
        raise OSError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    ds = app.source.datasets
    print(
        f"wds-tools view: {wio.redact(args.path)} ({len(ds)} dataset"
        f"{'s' if len(ds) != 1 else ''}, {sum(d.num_samples for d in ds):,} samples)",
        flush=True,
    )
    print(f"open {server.url}  (Ctrl-C stops)", flush=True)
    if args.open:
        import webbrowser

        webbrowser.open(server.url)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    from ..cli import standalone_main

    return standalone_main("view", argv)


if __name__ == "__main__":
    sys.exit(main())

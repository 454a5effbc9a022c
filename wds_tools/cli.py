"""``wds-tools``: look inside, check and mix token-shard datasets.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args)``;
modules are imported only when their subcommand runs, so ``inspect`` never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import List, Optional

__all__ = ["main", "standalone_main", "SUBCOMMANDS"]

# name -> (module, one-line help)
SUBCOMMANDS = {
    "inspect": ("wds_tools.inspect_cli", "show the samples of a shard, shard index or manifest"),
    "verify": ("wds_tools.verify", "re-read every shard of a manifest and check it"),
    "merge": ("wds_tools.concat_record", "build a dataset manifest from all shard indexes"),
    "mix": ("wds_tools.mix_cli", "dry-run a data config: target vs realized shares"),
    "stream": ("wds_tools.stream_cli", "replay exactly the batches one rank receives"),
    "view": ("wds_tools.view", "browse datasets, samples and mixtures in a local web app"),
}


def _parser(argv: List[str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="wds-tools", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = next((a for a in argv if a in SUBCOMMANDS), None)
    for name, (module, help_) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        if name == wanted:  # only the chosen subcommand's module is imported
            importlib.import_module(module).add_arguments(sp)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser(argv).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except (ValueError, OSError) as e:  # bad input: one clear line, no traceback
        print(f"wds-tools {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def standalone_main(name: str, argv: Optional[List[str]] = None) -> int:
    """``python -m wds_tools.<module> ...``: one subcommand on its own, same errors and exit codes."""
    return main([name] + list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())

"""The ``lumina`` console script: one subcommand per task.

Each subcommand is a module exposing ``add_arguments(parser)`` and ``run(args) -> int`` (exit
status). To add one, add a line to :data:`SUBCOMMANDS`; modules are imported only to build the
parser, so they must keep heavy imports (torch, transformers) inside functions.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Optional

__all__ = ["SUBCOMMANDS", "build_parser", "main"]

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "pre-tokenize": ("lumina.pre_tokenize", "conversations + images -> format-v1 token shards (one rank)"),
    "convert-records": (
        "lumina.convert_records",
        "the reference's pickle output (record.json) -> format-v1 shards",
    ),
    "make-tiny": ("lumina.tiny", "build the tiny offline tokenizer and Chameleon checkpoint"),
    "train": (
        "lumina.train",
        "train a Chameleon with DeepSpeed ZeRO-3 on a streamed mixture (launch with deepspeed/torchrun)",
    ),
    "export": ("lumina.export", "export a training checkpoint to a Hugging Face folder"),
    "view": ("lumina.view", "browse datasets in a local web app, image tokens drawn by the VQGAN"),
    "render": ("lumina.render", "decode a sample's image tokens to PNG files (Chameleon VQGAN)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lumina", description="Lumina-mGPT data and training tools.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return importlib.import_module(args._module).run(args)


if __name__ == "__main__":
    raise SystemExit(main())

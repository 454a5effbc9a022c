"""``python -m wds_tools.concat_record --sub_record_dir OUT --save_path OUT/index.json``

The reference pipeline's merge step, with its flags: builds the dataset manifest from every
shard index under ``--sub_record_dir`` (same as ``wds-tools merge``).
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .merge import MergeError, merge

__all__ = ["main", "add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser, reference_flags: bool = False) -> None:
    if reference_flags:
        p.add_argument(
            "--sub_record_dir",
            required=True,
            help="folder holding the shards and indexes of all ranks (searched recursively)",
        )
        p.add_argument(
            "--save_path",
            default=None,
            help="where to write the manifest (default: SUB_RECORD_DIR/index.json)",
        )
    else:
        p.add_argument("root", help="folder holding the shards and indexes of all ranks")
        p.add_argument(
            "-o",
            "--output",
            dest="save_path",
            default=None,
            help="where to write the manifest (default: ROOT/index.json)",
        )
    p.add_argument(
        "--no-checksum", action="store_true", help="skip re-hashing every shard (sizes are still checked)"
    )
    p.add_argument(
        "--allow-incomplete",
        action="store_true",
        help="merge the complete shards and list the problems in the manifest instead of failing",
    )


def run(args: argparse.Namespace) -> int:
    root = getattr(args, "sub_record_dir", None) or args.root
    try:
        m = merge(
            root,
            args.save_path,
            verify_checksums=not args.no_checksum,
            allow_incomplete=args.allow_incomplete,
            progress=sys.stderr.isatty(),
        )
    except MergeError as e:
        print(f"error: {e}", file=sys.stderr)
        for p in e.problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    for p in m.get("incomplete", []):
        print(f"warning: {p}", file=sys.stderr)
    print(
        f"manifest: {m['num_shards']} shards, {m['num_samples']} samples, {m['num_tokens']} tokens, "
        f"{m['num_failed']} failed items -> {args.save_path or root + '/index.json'}"
    )
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m wds_tools.concat_record",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p, reference_flags=True)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

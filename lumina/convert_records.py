"""Legacy import: the reference pre-tokenizer's output (per-item pickles + record list) -> format v1.

The reference writes one ``files/{i}.pkl`` per item (``{"token": [...], "label": [...], "id": i}``)
and a record list (``record.json``: ``[{"file": path, "len": n, "id": i}, ...]``, or the per-rank
``{rank}-of-{splits}-record.jsonl`` files it is concatenated from). This command reads them and
writes format-v1 shards plus the dataset manifest, for users migrating existing data.

Pickle is read only here, only from the files the user names, and only when this command runs;
even then a restricted unpickler refuses anything but plain lists, dicts, strings and numbers,
which is all the reference stores. Bad records go to ``errors-r00000.jsonl``; the run goes on.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import re
import sys
from typing import Any, Iterator, Optional

import numpy as np

from lumina.errors_log import ErrorLog, errors_file_name

__all__ = ["add_arguments", "convert_records", "load_legacy_item", "main", "read_records", "run"]

_RECORD_JSONL = re.compile(r"^(\d+)-of-(\d+)-record\.jsonl$")


class _PlainUnpickler(pickle.Unpickler):
    """Builtin containers and numbers only: refuses every class or function reference."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: legacy items hold only lists and ints"
        )


def load_legacy_item(path: str) -> dict:
    """One reference ``.pkl`` item, validated: ``{"token": [...], "label": [...], "id": ...}``."""
    with open(path, "rb") as f:
        item = _PlainUnpickler(io.BytesIO(f.read())).load()
    if not isinstance(item, dict) or "token" not in item or "label" not in item:
        raise ValueError("not a reference item (a dict with 'token' and 'label')")
    if len(item["token"]) != len(item["label"]):
        raise ValueError(f"token ({len(item['token'])}) and label ({len(item['label'])}) lengths differ")
    return item


def read_records(record: str) -> list[dict]:
    """The record list: ``record.json``, one ``*-record.jsonl``, or a folder of them (rank order)."""
    if os.path.isdir(record):
        files = sorted(
            (f for f in os.listdir(record) if _RECORD_JSONL.match(f)), key=lambda f: int(f.split("-")[0])
        )
        if not files:
            raise ValueError(f"--record {record}: no N-of-M-record.jsonl files in this folder")
        return [r for f in files for r in _read_jsonl(os.path.join(record, f))]
    if record.endswith(".jsonl"):
        return _read_jsonl(record)
    with open(record) as f:
        records = json.load(f)
    if not isinstance(records, list):
        raise ValueError(f"--record {record}: expected a JSON list of {{file, len, id}} records")
    return records


def _read_jsonl(path: str) -> list[dict]:
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # the reference's own concat skips a torn last line the same way
    return out


def _resolve(path: str, base: str) -> str:
    if os.path.isabs(path) or os.path.exists(path):
        return path
    return os.path.join(base, path)


def _key(record_id: Any, position: int) -> str:
    if isinstance(record_id, int):
        return f"{record_id:09d}"
    text = re.sub(r"[^A-Za-z0-9_-]", "_", str(record_id)) if record_id is not None else ""
    return text or f"pos{position:09d}"


def _image_blocks(tokens: np.ndarray, ids: Optional[dict]) -> list[dict]:
    """Recover image block metadata from the tokens (needs the tokenizer's ids)."""
    if not ids:
        return []
    blocks = []
    for start in np.flatnonzero(tokens == ids["start"]):
        if start + 2 >= len(tokens):
            continue
        h = (int(tokens[start + 1]) - ids["grid0"]) * 32
        w = (int(tokens[start + 2]) - ids["grid0"]) * 32
        n = 4 + (h // 16) * (w // 16 + 1)
        if h > 0 and w > 0 and start + n <= len(tokens) and tokens[start + n - 1] == ids["end"]:
            blocks.append({"offset": int(start), "h": h, "w": w, "grid": [h // 16, w // 16], "num_tokens": n})
    return blocks


def _iter_items(records: list[dict], base: str, start: int) -> Iterator[tuple[int, dict, Any]]:
    for position in range(start, len(records)):
        record = records[position]
        try:
            path = _resolve(record["file"], base)
            yield position, record, load_legacy_item(path)
        except (OSError, ValueError, KeyError, TypeError, pickle.UnpicklingError, EOFError) as e:
            yield position, record, e


def convert_records(
    record: str,
    out_dir: str,
    tokenizer: Optional[str] = None,
    vocab_size: int = 65536,
    max_samples_per_shard: int = 1000,
    max_shard_bytes: int = 256 << 20,
    merge: bool = True,
) -> dict:
    """Convert; return counts. Resumable: a rerun continues after the last complete shard."""
    from wds_tools.writer import ShardWriter

    records = read_records(record)
    ids, identity = None, None
    if tokenizer:
        ids, vocab_size, identity = _tokenizer_info(tokenizer)
    base = record if os.path.isdir(record) else os.path.dirname(os.path.abspath(record))
    writer = ShardWriter(
        out_dir,
        vocab_size=vocab_size,
        max_samples=max_samples_per_shard,
        max_bytes=max_shard_bytes,
        tokenizer=identity,
        resume=True,
    )
    errors = ErrorLog(
        os.path.join(out_dir, errors_file_name(0)),
        keep_below=writer.resume_cursor,
        source=os.path.basename(record),
    )
    with writer:
        for position, rec, item in _iter_items(records, base, writer.resume_cursor):
            if isinstance(item, Exception):
                errors.write(
                    {"index": position, "reason": "bad_record", "message": f"{type(item).__name__}: {item}"}
                )
            else:
                _write_item(writer, position, rec, item, ids, errors)
            writer.cursor = position + 1
        writer.close(
            extra={"num_failed": errors.num_failed, "source": os.path.basename(record), "legacy": True}
        )
    errors.close()
    result = {"num_records": len(records), "num_samples": writer.num_samples, "num_failed": errors.num_failed}
    if merge:
        from wds_tools.merge import merge as merge_shards

        merge_shards(out_dir, save_path=os.path.join(out_dir, "index.json"))
    return result


def _write_item(writer, position: int, rec: dict, item: dict, ids: Optional[dict], errors: ErrorLog) -> None:
    from wds_tools.format import FormatError

    record_id = item.get("id", rec.get("id"))
    tokens = np.asarray(item["token"], dtype=np.int64)
    meta = {
        "source": "legacy",
        "index": record_id,
        "legacy_file": rec.get("file"),
        "images": _image_blocks(tokens, ids),
    }
    try:
        writer.write(
            _key(record_id, position), tokens, labels=np.asarray(item["label"], dtype=np.int64), meta=meta
        )
    except (FormatError, ValueError) as e:
        errors.write({"index": position, "reason": "bad_record", "message": str(e)})


def _tokenizer_info(name: str) -> tuple[dict, int, dict]:
    from transformers import AutoTokenizer

    from lumina.pre_tokenize import tokenizer_identity
    from lumina.text_tokens import lookup_token_id

    tok = AutoTokenizer.from_pretrained(name)
    ids = {
        "start": lookup_token_id(tok, "<racm3:break>"),
        "end": lookup_token_id(tok, "<eoss>"),
        "grid0": lookup_token_id(tok, "<reserved08800>"),
    }
    return ids, len(tok), tokenizer_identity(name, tok)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--record",
        required=True,
        help="the reference's record.json, a N-of-M-record.jsonl, or the folder holding them",
    )
    p.add_argument("--out_dir", required=True, help="output folder for format-v1 shards and index.json")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer (folder or hub id): vocabulary size, identity, and image blocks in the metadata",
    )
    p.add_argument(
        "--vocab_size",
        type=int,
        default=65536,
        help="vocabulary size when no --tokenizer is given (Chameleon: 65536)",
    )
    p.add_argument(
        "--max_samples_per_shard", type=int, default=1000, help="a shard is completed at this many samples"
    )
    p.add_argument("--max_shard_mb", type=float, default=256, help="... or at this many MiB")
    p.add_argument("--no_merge", action="store_true", help="do not write index.json at the end")


def run(args: argparse.Namespace) -> int:
    try:
        result = convert_records(
            args.record,
            args.out_dir,
            tokenizer=args.tokenizer,
            vocab_size=args.vocab_size,
            max_samples_per_shard=args.max_samples_per_shard,
            max_shard_bytes=int(args.max_shard_mb * (1 << 20)),
            merge=not args.no_merge,
        )
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"converted {result['num_samples']} of {result['num_records']} records "
        f"({result['num_failed']} failed) into {args.out_dir}",
        file=sys.stderr,
    )
    return 1 if result["num_samples"] == 0 and result["num_failed"] else 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="lumina convert-records", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

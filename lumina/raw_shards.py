"""Raw image-text webdataset shards (the img2dataset layout) as pre-tokenizer input.

A raw shard is a tar of ``KEY.jpg`` + ``KEY.txt`` / ``KEY.json`` members (LAION, DataComp,
CC12M, COYO, any img2dataset crawl), local, ``https://`` or ``s3://``, read sequentially through
:func:`wds_tools.io.open_range` (ranges, retries, resume at the byte). Members are grouped by
key as webdataset does (the path up to the first dot of the file name; consecutive members).
Only the image (``jpg``, ``jpeg``, ``png``, ``webp``), ``txt`` and ``json`` members are kept;
anything else (``.pyd``, ``.pickle``, ``.cls`` ...) is skipped unread, never decoded.

Shards are the unit of rank splitting: shard ``s`` (its position in the expanded list) belongs to
rank ``s % splits``. Sample ``j`` of shard ``s`` has input index ``s * SOURCE_STRIDE + j``, so
keys are the same for any number of ranks, and the resume state (``cursor_state``: shard, sample
number and byte offset of the next sample) lets a rerun continue inside a shard with one ranged
read, without re-reading what was done.
"""

from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional

from wds_tools import io as wio
from wds_tools.format import BLOCK, FormatError, padded, parse_tar_header

__all__ = [
    "IMAGE_EXTENSIONS",
    "SOURCE_STRIDE",
    "RawSample",
    "caption_of",
    "iter_raw_items",
    "iter_tar_members",
    "group_by_key",
    "shard_name",
]

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
KEPT_EXTENSIONS = IMAGE_EXTENSIONS + ("txt", "json")
SOURCE_STRIDE = 10**9  # input index = source number * SOURCE_STRIDE + position in the source
MAX_KEPT_MEMBER = 256 << 20  # a kept member larger than this is a bad sample, not a memory spike
MAX_EXTENDED_HEADER = 1 << 20  # pax / long-name headers are small; a huge one is corruption


@dataclass
class RawSample:
    """One grouped sample of a raw shard, or (``error`` set) what went wrong with the shard.

    ``end`` is the byte offset just after the sample: where a resumed read starts.
    """

    key: str
    shard: str  # the shard's file name (no URL: no credentials in metadata)
    members: dict  # extension (lower case) -> payload bytes, kept members only
    offset: int = 0
    end: int = 0
    shard_no: int = 0
    position: int = 0
    error: Optional[tuple] = None  # (reason, message) of a shard-level failure
    oversize: Optional[str] = None  # name of a kept member that was too large (not read)

    def image_member(self) -> Optional[tuple[str, bytes]]:
        """``(extension, bytes)`` of the first image member, by extension preference."""
        for ext in IMAGE_EXTENSIONS:
            if ext in self.members:
                return ext, self.members[ext]
        return None


def caption_of(sample: RawSample, caption_key: Optional[str]) -> Optional[str]:
    """The caption: ``json[caption_key]`` when a key is given, else the ``.txt`` member, else
    ``json["caption"]``; ``None`` when there is none (or it is blank)."""
    text: Any = None
    if caption_key is None and "txt" in sample.members:
        text = sample.members["txt"].decode("utf-8")
    elif "json" in sample.members:
        doc = json.loads(sample.members["json"])
        if isinstance(doc, dict):
            text = doc.get(caption_key or "caption")
    if not isinstance(text, str) or not text.strip():
        return None
    return text.strip()


def _pax_fields(payload: bytes) -> dict:
    """Records ``"LEN key=value\\n"`` of a pax extended header."""
    fields, pos = {}, 0
    while pos < len(payload):
        space = payload.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(payload[pos:space])
        except ValueError:
            break
        record = payload[space + 1 : pos + length - 1]
        key, _, value = record.partition(b"=")
        fields[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos += max(length, 1)
    return fields


def iter_tar_members(f, where: str, start: int = 0) -> Iterator[tuple[str, int, int, Optional[bytes]]]:
    """``(name, header_offset, end_offset, payload)`` of the regular files of a tar stream
    positioned at byte ``start``. Payloads are read only for kept extensions up to
    ``MAX_KEPT_MEMBER`` bytes; other members are skipped unread (``payload`` is ``None``). Pax
    (``x``/``g``) and GNU long-name (``L``) headers are honoured, as Python's ``tarfile`` (hence
    webdataset's and img2dataset's writers) emits them. ``header_offset`` is where the member's
    first header (extended ones included) starts: a resumed read may begin there."""
    pos, pending_name, pending_size, first = start, None, None, None
    while True:
        block = f.read(BLOCK)
        if len(block) < BLOCK or block == b"\0" * BLOCK:
            if block.strip(b"\0"):
                raise FormatError(f"{where}: truncated tar header at byte {pos}")
            return
        name, size = parse_tar_header(block, f"{where} at byte {pos}")
        kind = block[156:157]
        first = pos if first is None else first
        if kind in (b"x", b"g", b"L"):
            if size > MAX_EXTENDED_HEADER:
                raise FormatError(
                    f"{where}: extended tar header of {size} bytes at byte {pos} (corrupt shard)"
                )
            header = _read_exact(f, padded(size), where, pos)[:size]
            pos += BLOCK + padded(size)
            if kind == b"x":
                fields = _pax_fields(header)
                pending_name = fields.get("path", pending_name)
                if fields.get("size", "").isdigit():
                    pending_size = int(fields["size"])
            elif kind == b"L":
                pending_name = header.split(b"\0", 1)[0].decode("utf-8", "replace")
            continue
        member = pending_name or name
        size = pending_size if pending_size is not None else size
        header_at, pending_name, pending_size, first = first, None, None, None
        regular = kind in (b"0", b"\0", b"7")
        keep = regular and _split_name(member)[1] in KEPT_EXTENSIONS and size <= MAX_KEPT_MEMBER
        payload = None
        if keep:
            payload = _read_exact(f, padded(size), where, pos)[:size]
        else:
            _skip(f, padded(size), where, pos)
        pos += BLOCK + padded(size)
        if regular:
            yield member, header_at, pos, payload


def _read_exact(f, n: int, where: str, pos: int) -> bytes:
    data = f.read(n)
    if len(data) < n:
        raise FormatError(f"{where}: truncated tar: member at byte {pos} is cut short")
    return data


def _skip(f, n: int, where: str, pos: int) -> None:
    while n > 0:
        got = len(f.read(min(n, 1 << 20)))
        if got == 0:
            raise FormatError(f"{where}: truncated tar: member at byte {pos} is cut short")
        n -= got


def _split_name(name: str) -> tuple[str, str]:
    """webdataset's ``base_plus_ext``: key = path up to the first dot of the file name."""
    directory, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return (posixpath.join(directory, stem) if directory else stem), ext.lower()


def group_by_key(members: Iterable[tuple[str, int, int, Optional[bytes]]], shard: str) -> Iterator[RawSample]:
    """Consecutive members sharing a key -> one :class:`RawSample` (kept members only)."""
    cur: Optional[RawSample] = None
    for name, header_at, end, payload in members:
        key, ext = _split_name(name)
        if cur is not None and key != cur.key:
            yield cur
            cur = None
        if cur is None:
            cur = RawSample(key=key, shard=shard, members={}, offset=header_at, end=end)
        cur.end = end
        if ext in KEPT_EXTENSIONS:
            if payload is None:
                cur.oversize = name
            elif ext not in cur.members:
                cur.members[ext] = payload
    if cur is not None:
        yield cur


def shard_name(url: str) -> str:
    """The file name of a shard URL, without credentials or query."""
    return os.path.basename(wio.redact(url).rstrip("/")) or wio.redact(url)


def iter_raw_items(
    urls: Iterable[str],
    splits: int,
    rank: int,
    start: int = 0,
    state: Optional[dict] = None,
    opts: wio.IOOptions = wio.DEFAULT,
) -> Iterator[tuple[int, RawSample]]:
    """``(index, sample)`` of the shards rank ``rank`` owns, from input index ``start`` on.

    ``urls`` may be a lazy iterator (a brace expansion of 10,000 shards is never listed whole).
    ``state`` (``{"shard_no", "position", "byte"}``, saved with the cursor) makes the read of the
    shard holding ``start`` begin at that byte. A shard that is missing or corrupt yields one
    sample with ``error`` set (its index is the next one of that shard) and the run moves on.
    """
    for shard_no, url in enumerate(urls):
        if shard_no % splits != rank or (shard_no + 1) * SOURCE_STRIDE <= start:
            continue
        base = shard_no * SOURCE_STRIDE
        position, byte = 0, 0
        if start > base:
            position = start - base
            if not state or state.get("shard_no") != shard_no or state.get("position") != position:
                raise ValueError(
                    f"cannot resume inside raw shard {shard_name(url)} at sample {position}: "
                    "the saved resume state does not name it (was the input list changed?)"
                )
            byte = int(state["byte"])
        yield from _shard_items(url, shard_no, base, position, byte, opts)


def _shard_items(
    url: str, shard_no: int, base: int, position: int, byte: int, opts: wio.IOOptions
) -> Iterator[tuple[int, RawSample]]:
    name, where = shard_name(url), wio.redact(url)
    try:
        with wio.open_range(url, byte, None, opts) as f:
            for sample in group_by_key(iter_tar_members(f, where, byte), name):
                sample.shard_no, sample.position = shard_no, position
                yield base + position, sample
                position += 1
    except FileNotFoundError as e:
        yield base + position, _failed(name, shard_no, position, "missing_shard", wio.scrub(str(e)))
    except (FormatError, OSError) as e:
        yield (
            base + position,
            _failed(
                name,
                shard_no,
                position,
                "unreadable_shard",
                f"{where}: rest of the shard skipped: {wio.scrub(str(e))}",
            ),
        )


def _failed(name: str, shard_no: int, position: int, reason: str, message: str) -> RawSample:
    return RawSample(
        key="", shard=name, members={}, shard_no=shard_no, position=position, error=(reason, message)
    )

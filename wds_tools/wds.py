"""Read token shards with the real ``webdataset`` package: decoded ids, labels and metadata.

The shards are plain tars, so ``webdataset.WebDataset(urls)`` already groups their members into
raw samples (``{"__key__", "__url__", "input_ids.npy": bytes, "json": bytes}``). This module
turns those into the samples :func:`wds_tools.reader.iter_samples` yields, as ordinary
webdataset stages that compose with webdataset's own (``shuffle``, ``batched``,
``with_epoch``, ``split_by_node``, ``split_by_worker``)::

    import webdataset as wds
    from wds_tools.wds import decode_tokens, pad_collate, select_members, token_pipeline

    # a user's own pipeline: map the raw samples through decode_tokens (never .decode())
    ds = (wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node,
                         select_files=select_members)
          .map(decode_tokens).shuffle(1000).batched(8, collation_fn=pad_collate))

    # or the same with safe defaults, this project's transport and manifests
    ds = token_pipeline("s3://bucket/chat/index.json", shuffle=1000).batched(8, pad_collate)

Safety: nothing is unpickled. ``decode_tokens`` reads only ``KEY.input_ids.npy``
(``numpy.lib.format.read_array(allow_pickle=False)``) and ``KEY.json`` (``json.loads``) and
ignores every other member; do not put webdataset's ``.decode()`` before it (its default
decoders unpickle ``.pyd``/``.pickle`` members; ``decode_tokens`` refuses decoded input).
``select_members`` keeps other members from being read at all. :func:`token_pipeline` opens
URLs with :func:`wds_tools.io.open_range` (local, ``file://``, ``http(s)://`` with retries and
resume, ``s3://`` through boto3, the optional shard cache) and refuses ``pipe:`` URLs unless
``allow_pipe=True``. For ``s3://`` in a plain ``WebDataset`` (which has no S3 opener), call
:func:`register_gopen` once per process.

torch: ``import webdataset`` (1.0.2) imports torch at module level when torch is installed
(``webdataset.pytorch`` subclasses ``torch.utils.data.IterableDataset``; without torch it uses
stand-ins and works). This module therefore imports webdataset only inside the functions that
build pipelines, so ``import wds_tools.wds`` and :func:`decode_tokens` need neither.
"""

from __future__ import annotations

import functools
import io
import json
import logging
from dataclasses import replace
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Union

import numpy as np

from . import io as wio
from .collate import pad_batch
from .format import (
    FORMAT_NAME,
    IDS_SUFFIX,
    JSON_SUFFIX,
    FormatError,
    check_spans,
    num_in_spans,
    spans_to_labels,
)
from .reader import expand_urls, load_manifest

__all__ = [
    "MEMBERS",
    "select_members",
    "decode_tokens",
    "pad_collate",
    "shard_urls",
    "open_shards_stage",
    "make_handler",
    "token_pipeline",
    "register_gopen",
    "hf_features",
]

log = logging.getLogger(__name__)

MEMBERS = (IDS_SUFFIX, JSON_SUFFIX)  # the members of a sample; everything else is ignored
Handler = Callable[[BaseException], bool]


def select_members(fname: str) -> bool:
    """``select_files`` predicate for webdataset: only ``KEY.input_ids.npy`` and ``KEY.json``
    are read from the tar (other members are skipped unread, never decoded)."""
    return fname.rsplit("/", 1)[-1].partition(".")[2] in MEMBERS


def decode_tokens(sample: Mapping[str, Any]) -> Dict[str, Any]:
    """Map stage: a raw webdataset sample (member bytes) -> a decoded token sample.

    Returns ``__key__``, ``__url__``, ``input_ids`` (1-D, the stored unsigned dtype, e.g. uint16;
    cast in collation), ``labels`` (int64, the token id inside the ``supervised`` spans and -100
    elsewhere, built by :func:`wds_tools.format.spans_to_labels`), ``supervised`` (the spans),
    ``num_supervised`` and ``meta``: the fields of :func:`wds_tools.reader.iter_samples`.
    Members other than ``input_ids.npy`` and ``json`` are ignored. Raises FormatError naming
    the sample when a member is missing, already decoded, or not this format.
    """
    key = sample.get("__key__", "?")
    url = sample.get("__url__", "")
    where = f"{wio.redact(str(url)) or '?'}: sample {key!r}"
    raw_ids, raw_json = _member(sample, IDS_SUFFIX, where), _member(sample, JSON_SUFFIX, where)
    try:  # the .npy format only: no pickle, no .npz, no fallback
        ids = np.lib.format.read_array(io.BytesIO(raw_ids), allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - numpy raises ValueError, SyntaxError, ... on garbage
        raise FormatError(f"{where}: {IDS_SUFFIX} is not a .npy array: {type(e).__name__}: {e}") from None
    if ids.ndim != 1 or ids.dtype.kind != "u":
        raise FormatError(f"{where}: {IDS_SUFFIX} holds {ids.dtype} {ids.shape}, not 1-D unsigned token ids")
    try:
        doc = json.loads(raw_json)
        spans, meta = doc["supervised"], doc.get("meta", {})
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise FormatError(f"{where}: bad {JSON_SUFFIX} member: {e!r}") from None
    check_spans(spans, int(ids.shape[0]), where)
    return {
        "__key__": key,
        "__url__": url,
        "input_ids": ids,
        "labels": spans_to_labels(ids, spans),
        "supervised": spans,
        "num_supervised": num_in_spans(spans),
        "meta": meta,
    }


def _member(sample: Mapping[str, Any], name: str, where: str) -> bytes:
    raw = sample.get(name)
    if raw is None:
        raise FormatError(f"{where}: lacks its {name} member (not a {FORMAT_NAME} shard?)")
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise FormatError(
            f"{where}: {name} is a {type(raw).__name__}, not bytes: map "
            "decode_tokens over raw samples, without webdataset's .decode()"
        )
    return bytes(raw)


def pad_collate(
    samples: Sequence[Mapping[str, Any]], pad_id: int = 0, max_seq_len: Optional[int] = None
) -> Dict[str, Any]:
    """``collation_fn`` for ``.batched(n, collation_fn=...)``: decoded samples -> right-padded
    int64 numpy arrays ``input_ids``, ``labels`` (-100 on padding), ``attention_mask`` (1/0),
    ``lengths`` (per row, after truncation to ``max_seq_len``), plus lists ``__key__``,
    ``__url__`` and ``meta``. Same layout as the loader's batches (``collate.pad_batch``);
    numpy, so a ``DataLoader(batch_size=None)`` turns the arrays into tensors."""
    if not samples:
        raise ValueError("pad_collate: empty batch")
    if max_seq_len is not None and max_seq_len < 1:
        raise ValueError(f"pad_collate: max_seq_len must be >= 1, got {max_seq_len}")
    ids = [s["input_ids"] for s in samples]
    limit = max_seq_len if max_seq_len is not None else max(len(x) for x in ids)
    arr, _ = pad_batch(ids, [s["supervised"] for s in samples], max(limit, 1), pad_id=pad_id)
    return {
        "input_ids": arr[0],
        "labels": arr[1],
        "attention_mask": arr[2],
        "lengths": np.array([min(len(x), limit) for x in ids], dtype=np.int64),
        "__key__": [s["__key__"] for s in samples],
        "__url__": [s.get("__url__", "") for s in samples],
        "meta": [s.get("meta", {}) for s in samples],
    }


def shard_urls(source: Union[str, Sequence[str]], opts: wio.IOOptions = wio.DEFAULT) -> List[str]:
    """Shard URLs of ``source``: shard URLs, brace patterns of them, or dataset manifests
    (``.../index.json``, local, HTTP or S3; their shard entries resolved and checked)."""
    urls: List[str] = []
    for url in expand_urls(source):
        if url.endswith(".json"):
            urls.extend(s["url"] for s in load_manifest(url, opts)["shards"])
        else:
            urls.append(url)
    if not urls:
        raise ValueError(f"no shard URLs in {source!r}")
    return urls


def make_handler(on_error: Union[str, Handler]) -> Handler:
    """A webdataset exception handler: ``"fail"`` re-raises, ``"skip"`` logs a warning and goes
    on (a bad sample is dropped; a broken shard's remaining samples are dropped; a partial
    sample never reaches the caller, as ``decode_tokens`` needs both members); a callable is
    used as given."""
    if callable(on_error):
        return on_error
    if on_error == "fail":
        return _reraise
    if on_error == "skip":
        return _warn_and_skip
    raise ValueError(f"on_error must be 'fail', 'skip' or a callable, got {on_error!r}")


def _reraise(exn: BaseException) -> bool:
    raise exn


def _warn_and_skip(exn: BaseException) -> bool:
    log.warning("skipping: %s", wio.scrub(f"{type(exn).__name__}: {exn}"))
    return True


def open_shards_stage(
    src: Iterable[Any], opts: wio.IOOptions = wio.DEFAULT, handler: Handler = _reraise
) -> Iterator[Dict[str, Any]]:
    """Pipeline stage: ``{"url": ...}`` items (or URL strings) -> ``{"url", "stream"}`` opened
    by :func:`wds_tools.io.open_range`; each stream is closed when the next URL is asked for."""
    for item in src:
        url = item["url"] if isinstance(item, Mapping) else item
        try:
            stream = wio.open_range(url, 0, None, opts)
        except Exception as e:  # noqa: BLE001 - the handler decides (webdataset convention)
            if handler(e):
                continue
            break
        try:
            yield {"url": url, "stream": stream}
        finally:
            stream.close()


def token_pipeline(
    urls: Union[str, Sequence[str]],
    *,
    shuffle: int = 0,
    shardshuffle: int = 0,
    seed: Optional[int] = None,
    split_by_node: bool = True,
    split_by_worker: bool = True,
    on_error: Union[str, Handler] = "fail",
    opts: Optional[wio.IOOptions] = None,
    allow_pipe: bool = False,
):
    """A ``webdataset`` pipeline of decoded token samples (:func:`decode_tokens`).

    ``urls``: shard URLs, brace patterns, or manifests (see :func:`shard_urls`). Stages, in
    webdataset's order: shard list, ``split_by_node`` (ranks from ``torch.distributed`` or
    ``RANK``/``WORLD_SIZE``), ``split_by_worker`` (DataLoader workers), a shard shuffle buffer
    of ``shardshuffle`` (0: off), the opener (:func:`open_shards_stage`), the tar expander
    reading only this format's members, grouping by key, ``decode_tokens``, and a sample
    shuffle buffer of ``shuffle`` (0: off). With a ``seed``, both shuffles are webdataset's
    ``detshuffle`` (seeded by ``seed`` + epoch: repeatable, a new order each pass); ``None``:
    webdataset's time-based ``shuffle``. ``on_error``: see :func:`make_handler`. ``opts``: transport
    settings (retries, timeouts, ``cache_dir``); ``pipe:`` URLs run only with ``allow_pipe``.

    The result is a ``webdataset`` fluid pipeline: go on with ``.shuffle(n)``,
    ``.batched(n, collation_fn=pad_collate)``, ``.with_epoch(n)``, ``.map(f)``, or hand it to
    ``torch.utils.data.DataLoader``/``webdataset.WebLoader``.
    """
    import webdataset as wds
    from webdataset.tariterators import group_by_keys, tar_file_expander

    opts = replace(opts or wio.DEFAULT, allow_pipe=allow_pipe)
    handler = make_handler(on_error)
    pipe = wds.FluidWrapper(wds.SimpleShardList(shard_urls(urls, opts)))
    if split_by_node:
        pipe.append(wds.split_by_node)
    if split_by_worker:
        pipe.append(wds.split_by_worker)
    if shardshuffle > 0:
        pipe.append(_shuffler(wds, shardshuffle, seed))
    pipe.append(functools.partial(open_shards_stage, opts=opts, handler=handler))
    pipe.append(wds.pipelinefilter(tar_file_expander)(handler=handler, select_files=select_members))
    pipe.append(wds.pipelinefilter(group_by_keys)(handler=handler))
    pipe.append(wds.map(decode_tokens, handler=handler))
    if shuffle > 0:
        pipe.append(_shuffler(wds, shuffle, seed))
    return pipe


def _shuffler(wds: Any, bufsize: int, seed: Optional[int]) -> Any:
    if seed is None:
        return wds.shuffle(bufsize)
    return wds.detshuffle(bufsize, initial=min(100, bufsize), seed=seed)


def register_gopen(opts: wio.IOOptions = wio.DEFAULT, schemes: Sequence[str] = ("s3",)) -> Dict[str, Any]:
    """Let a plain ``webdataset.WebDataset`` open ``schemes`` URLs through this project's
    transport (webdataset 1.0.2 has no ``s3://`` opener; its ``http(s)://`` one is a ``curl``
    pipe without resume): sets ``webdataset.gopen.gopen_schemes[scheme]`` for this process
    (DataLoader workers started by fork inherit it; call it again under spawn). Returns the
    previous entries, so a caller can put them back."""
    import importlib

    # the module: the package attribute ``webdataset.gopen`` is the function of that name
    gopen = importlib.import_module("webdataset.gopen")
    for s in schemes:
        if s not in ("s3", "http", "https"):
            raise ValueError(f"register_gopen: scheme {s!r} is not one of s3, http, https")
    previous = {s: gopen.gopen_schemes.get(s) for s in schemes}
    for s in schemes:
        gopen.gopen_schemes[s] = functools.partial(_gopen, opts=opts)
    return previous


def _gopen(
    url: str, mode: str = "rb", bufsize: int = 8192, *, opts: wio.IOOptions, **kw: Any
) -> io.BufferedReader:
    if mode != "rb":
        raise ValueError(f"{wio.redact(url)}: this transport only reads (mode {mode!r})")
    return wio.open_range(url, 0, None, opts)


def hf_features(dtype: Union[str, np.dtype] = "uint16"):
    """``features=`` for ``datasets.load_dataset("webdataset", ...)`` on these shards.

    Without it, ``datasets`` infers the ``json`` column's schema from the first 5 samples of
    the first shard: a metadata key first seen later is dropped, and a field that is empty
    there and filled later (``"images": []``, ``"supervised": []``) fails with "Couldn't cast
    array of type ... to null". Here ``meta`` is a ``datasets.Json()`` (any JSON; needs
    datasets >= 4.7) and ``supervised`` a list of ``[start, end]`` int64 pairs."""
    import datasets

    return datasets.Features(
        {
            IDS_SUFFIX: datasets.List(datasets.Value(np.dtype(dtype).name)),
            JSON_SUFFIX: {
                "supervised": datasets.List(datasets.List(datasets.Value("int64"))),
                "meta": datasets.Json(),
            },
            "__key__": datasets.Value("string"),
            "__url__": datasets.Value("string"),
        }
    )

"""The data config: which datasets to stream and how to mix them, validated once.

Two YAML forms are accepted (see ``docs/streaming.md``)::

    seed: 1234                 # global seed of shard order, sample order and nothing else
    weight_by: samples         # or tokens: weights are shares of samples or of tokens
    on_error: skip             # or fail: what a corrupt or truncated shard does
    shuffle: {shards: true, samples: true, block_size: 256, window_blocks: 1}
    datasets:
      - name: chat                       # default: derived from the manifest path
        manifest: /data/chat/index.json  # local path (relative to this file), https://, s3://
        weight: 0.7
        max_epochs: 2                    # optional: stop using it after 2 epochs
        group: default                   # optional: datasets of different groups never share a batch

and the reference project's form, with its meaning (a dataset's weight is its number of samples
times ``ratio``; datasets of different ``type`` never share a batch)::

    META:
      - {path: /data/chat/index.json, type: default, ratio: 0.4}

Errors are ``ValueError`` naming the entry (by position and name) and the key to change.

Security: ``pipe:`` manifests (a shell command) are refused unless ``allow_pipe: true`` (or the
caller's ``allow_pipe=True``); ``file://`` URLs are local paths (other hosts refused); only
local paths, ``file://``, ``http(s)://`` and ``s3://`` are accepted. With ``allowed_roots`` (in
the config, or the caller's ``allowed_roots=``; both must hold when both are given) every
manifest must lie under one of the roots: local folders (symlinks and ``..`` resolved) or URL
prefixes (``https://host/data/``, ``s3://bucket/prefix/``). Messages never show a URL's user
info or query string (signatures).
"""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union
from urllib.parse import urlsplit

import yaml

from .io import IOOptions, redact
from .schedule import WeightSchedule, parse_weight

__all__ = [
    "DatasetConfig",
    "ShuffleConfig",
    "CacheConfig",
    "DataConfig",
    "load_data_config",
    "parse_data_config",
    "resolve_data_config",
    "parse_bytes",
    "config_summary",
    "WEIGHT_BY",
    "ON_ERROR",
]

WEIGHT_BY = ("samples", "tokens")
ON_ERROR = ("skip", "fail")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,80}$")


@dataclass(frozen=True)
class DatasetConfig:
    """One dataset of the mixture.

    ``weight`` is relative (weights need not sum to 1). With ``ratio`` set (the reference's
    ``META`` form), the effective weight is ``ratio * num_samples`` of the manifest, resolved when
    the manifest is opened. ``max_epochs=None`` cycles forever.
    """

    name: str
    manifest: str
    weight: float = 1.0
    ratio: Optional[float] = None
    max_epochs: Optional[int] = None
    group: str = "default"
    schedule: Optional[WeightSchedule] = None  # weight over optimizer steps (``weight`` = its first)
    restart: bool = False  # at a resume: start this dataset over (its content changed on purpose)

    def weight_at(self, step: float) -> float:
        return self.schedule.at(step) if self.schedule is not None else self.weight


@dataclass(frozen=True)
class ShuffleConfig:
    """Shard order is permuted per epoch (``shards``); samples are shuffled inside windows of
    ``window_blocks`` blocks of up to ``block_size`` consecutive samples of one shard each
    (``samples``). Each block is one sequential read."""

    shards: bool = True
    samples: bool = True
    block_size: int = 256
    window_blocks: int = 1  # per partition: a rank holds (partitions / ranks) windows per dataset


@dataclass(frozen=True)
class CacheConfig:
    """The local whole-shard cache for remote datasets (``cache: {dir, max_bytes}``): one folder
    per node on local disk, shared by the node's ranks and workers (see ``wds_tools.cache``)."""

    dir: str
    max_bytes: int = 64 << 30


@dataclass(frozen=True)
class DataConfig:
    datasets: Tuple[DatasetConfig, ...]
    seed: int = 0
    weight_by: str = "samples"
    on_error: str = "fail"
    shuffle: ShuffleConfig = field(default_factory=ShuffleConfig)
    source: str = "<dict>"
    allow_pipe: bool = False  # pipe: manifests accepted (also needs IOOptions(allow_pipe))
    allowed_roots: Tuple[str, ...] = ()  # where manifests may live; () = anywhere
    verify_checksums: bool = False  # re-hash every shard on open (sha256 vs its index)
    cache: Optional[CacheConfig] = None  # cache remote shards whole in a local folder
    partitions: Optional[int] = None  # canonical partitions (None: chosen at the run's start)
    stratified: bool = False  # every global batch holds exactly its dataset counts

    @property
    def scheduled(self) -> bool:
        return any(d.schedule is not None for d in self.datasets)

    def io_options(self, base: IOOptions) -> IOOptions:
        """``base`` with what this config switches on: ``allow_pipe``, ``verify_checksums`` and
        the cache (a cache already set in ``base``, e.g. by a command-line flag, wins)."""
        kw: Dict[str, Any] = {}
        if self.allow_pipe and not base.allow_pipe:
            kw["allow_pipe"] = True
        if self.verify_checksums and not base.verify_checksums:
            kw["verify_checksums"] = True
        if self.cache is not None and not base.cache_dir:
            kw["cache_dir"], kw["cache_max_bytes"] = self.cache.dir, self.cache.max_bytes
        return replace(base, **kw) if kw else base

    @property
    def bounded(self) -> bool:
        """True when every dataset has ``max_epochs``: the stream then ends."""
        return all(d.max_epochs is not None for d in self.datasets)

    @property
    def groups(self) -> List[str]:
        """Group names in order of first appearance."""
        return list(dict.fromkeys(d.group for d in self.datasets))


def load_data_config(
    path: str, *, allowed_roots: Optional[Sequence[str]] = None, allow_pipe: bool = False
) -> DataConfig:
    """Read and validate a data config YAML; relative manifest paths are resolved against the
    folder of ``path``. ``allowed_roots``/``allow_pipe``: see :func:`parse_data_config`."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except yaml.YAMLError as e:
        first = " ".join(str(e).split())
        raise ValueError(f"{path}: not valid YAML: {first}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text: {e}") from None
    return parse_data_config(
        doc,
        where=path,
        base_dir=os.path.dirname(os.path.abspath(path)),
        allowed_roots=allowed_roots,
        allow_pipe=allow_pipe,
    )


def parse_data_config(
    doc: Any,
    where: str = "<dict>",
    base_dir: Optional[str] = None,
    *,
    allowed_roots: Optional[Sequence[str]] = None,
    allow_pipe: bool = False,
) -> DataConfig:
    """Validate a data config given as a mapping (the parsed YAML).

    ``allowed_roots`` (the caller's, trusted): every manifest must lie under one of them, in
    addition to the config's own ``allowed_roots``. ``allow_pipe``: accept ``pipe:`` manifests
    even when the config does not say ``allow_pipe: true``.
    """
    if not isinstance(doc, Mapping):
        raise ValueError(f"{where}: a data config must be a mapping with 'datasets' or 'META'")
    if "META" in doc and "datasets" in doc:
        raise ValueError(f"{where}: give either 'datasets' or 'META', not both")
    known = {
        "datasets",
        "META",
        "seed",
        "weight_by",
        "on_error",
        "shuffle",
        "allow_pipe",
        "allowed_roots",
        "verify_checksums",
        "cache",
        "partitions",
        "stratified",
    }
    _no_unknown(doc, known, where)
    pipe_ok = _bool(doc.get("allow_pipe", False), f"{where}: allow_pipe") or bool(allow_pipe)
    cfg_roots = _roots(doc.get("allowed_roots"), f"{where}: allowed_roots", base_dir)
    caller_roots = _roots(allowed_roots, "allowed_roots (caller)", None)
    policy = (pipe_ok, [r for r in (cfg_roots, caller_roots) if r is not None])
    seed = _int(doc.get("seed", 0), f"{where}: seed", lo=0)
    weight_by = _choice(doc.get("weight_by", "samples"), WEIGHT_BY, f"{where}: weight_by")
    on_error = _choice(doc.get("on_error", "fail"), ON_ERROR, f"{where}: on_error")
    shuffle = _shuffle(doc.get("shuffle", {}), f"{where}: shuffle")
    if "META" in doc:
        datasets = _meta_entries(doc["META"], where, base_dir, policy)
    else:
        datasets = _dataset_entries(doc.get("datasets"), where, base_dir, policy)
    names = [d.name for d in datasets]
    for i, n in enumerate(names):
        if names.index(n) != i:
            raise ValueError(
                f"{where}: datasets[{i}]: name {n!r} is used twice; give each dataset a unique 'name'"
            )
    return DataConfig(
        datasets=tuple(datasets),
        seed=seed,
        weight_by=weight_by,
        on_error=on_error,
        shuffle=shuffle,
        source=where,
        allow_pipe=pipe_ok,
        allowed_roots=tuple(cfg_roots or ()) + tuple(caller_roots or ()),
        verify_checksums=_bool(doc.get("verify_checksums", False), f"{where}: verify_checksums"),
        cache=_cache(doc.get("cache"), f"{where}: cache", base_dir),
        partitions=_opt_int(doc.get("partitions"), f"{where}: partitions", lo=1),
        stratified=_bool(doc.get("stratified", False), f"{where}: stratified"),
    )


def resolve_data_config(
    source: Union["DataConfig", str],
    *,
    seed: Optional[int] = None,
    shuffle: Optional[bool] = None,
    max_epochs: Optional[int] = None,
    weight_by: Optional[str] = None,
    on_error: Optional[str] = None,
) -> "DataConfig":
    """A ``DataConfig`` from what a user has at hand, with arguments overriding the config.

    ``source``: a ``DataConfig``, a data config YAML (``.yaml``/``.yml``), or a dataset
    manifest (a local path or URL of ``index.json``: one dataset, weight 1). ``shuffle=False``
    reads in stored order; ``max_epochs`` bounds every dataset (the stream then ends)."""
    if isinstance(source, DataConfig):
        cfg = source
    elif not isinstance(source, str):
        raise TypeError(f"expected a DataConfig, a config YAML or a manifest, got {source!r}")
    elif source.lower().endswith((".yaml", ".yml")):
        cfg = load_data_config(source)
    else:
        local = "://" not in source
        cfg = parse_data_config(
            {"datasets": [{"manifest": source}]},
            where=redact(source),
            base_dir=os.getcwd() if local else None,
        )
    kw: Dict[str, Any] = {}
    if seed is not None:
        kw["seed"] = _int(seed, "seed", lo=0)
    if weight_by is not None:
        kw["weight_by"] = _choice(weight_by, WEIGHT_BY, "weight_by")
    if on_error is not None:
        kw["on_error"] = _choice(on_error, ON_ERROR, "on_error")
    if shuffle is not None:
        kw["shuffle"] = replace(cfg.shuffle, shards=_bool(shuffle, "shuffle"), samples=shuffle)
    if max_epochs is not None:
        n = _int(max_epochs, "max_epochs", lo=1)
        kw["datasets"] = tuple(replace(d, max_epochs=n) for d in cfg.datasets)
    return replace(cfg, **kw) if kw else cfg


_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_bytes(v: Any, at: str) -> int:
    """A byte count: an integer, or a string like ``"500M"``, ``"64G"``, ``"1.5TB"`` (powers of
    1024)."""
    if isinstance(v, int) and not isinstance(v, bool):
        n = v
    elif isinstance(v, str):
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", v)
        if not m:
            raise ValueError(f"{at}: not a byte count: {v!r} (use e.g. 500M, 64G, 1T or bytes)")
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    else:
        raise ValueError(f"{at}: not a byte count: {v!r} (use e.g. 500M, 64G, 1T or bytes)")
    if n <= 0:
        raise ValueError(f"{at}: must be > 0 bytes, got {v!r}")
    return n


def _cache(doc: Any, at: str, base_dir: Optional[str]) -> Optional[CacheConfig]:
    if doc is None:
        return None
    if not isinstance(doc, Mapping):
        raise ValueError(f"{at}: must be a mapping {{dir: PATH, max_bytes: SIZE}}")
    _no_unknown(doc, {"dir", "max_bytes"}, at)
    d = doc.get("dir")
    if not isinstance(d, str) or not d.strip() or "://" in d or "\0" in d:
        raise ValueError(f"{at}.dir: required, a local folder path, got {d!r}")
    d = os.path.expanduser(os.path.expandvars(d))
    if not os.path.isabs(d) and base_dir is not None:
        d = os.path.join(base_dir, d)
    size = parse_bytes(doc.get("max_bytes", 64 << 30), f"{at}.max_bytes")
    return CacheConfig(dir=os.path.normpath(d), max_bytes=size)


# --- entries ---------------------------------------------------------------------------------


def _dataset_entries(
    entries: Any, where: str, base_dir: Optional[str], policy: tuple = (False, [])
) -> List[DatasetConfig]:
    if not isinstance(entries, list) or not entries:
        raise ValueError(
            f"{where}: 'datasets' must be a non-empty list of {{manifest: ..., weight: ...}} entries"
        )
    out = []
    for i, e in enumerate(entries):
        at = f"{where}: datasets[{i}]"
        if not isinstance(e, Mapping):
            raise ValueError(f"{at}: must be a mapping with 'manifest' and 'weight'")
        at = _named(at, e)
        _no_unknown(e, {"name", "manifest", "weight", "max_epochs", "group", "weight_by", "restart"}, at)
        if "weight_by" in e:
            raise ValueError(
                f"{at}: weight_by: set 'weight_by' once at the top level (a mixture "
                "is in samples or in tokens, not both)"
            )
        manifest = _manifest(e.get("manifest"), f"{at}: manifest", base_dir, policy)
        weight, schedule = parse_weight(e.get("weight", 1.0), f"{at}: weight")
        out.append(
            DatasetConfig(
                name=_name(e.get("name"), manifest, f"{at}: name"),
                manifest=manifest,
                weight=weight,
                max_epochs=_opt_int(e.get("max_epochs"), f"{at}: max_epochs", lo=1),
                group=_group(e.get("group", "default"), f"{at}: group"),
                schedule=schedule,
                restart=_bool(e.get("restart", False), f"{at}: restart"),
            )
        )
    return out


def _meta_entries(
    entries: Any, where: str, base_dir: Optional[str], policy: tuple = (False, [])
) -> List[DatasetConfig]:
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{where}: 'META' must be a non-empty list of {{path, type, ratio}} entries")
    out = []
    for i, e in enumerate(entries):
        at = f"{where}: META[{i}]"
        if not isinstance(e, Mapping):
            raise ValueError(f"{at}: must be a mapping with 'path', 'type' and 'ratio'")
        at = _named(at, e)
        _no_unknown(e, {"path", "type", "ratio", "name", "max_epochs"}, at)
        manifest = _manifest(e.get("path"), f"{at}: path", base_dir, policy)
        ratio = _positive(e.get("ratio", 1.0), f"{at}: ratio")
        out.append(
            DatasetConfig(
                name=_name(e.get("name"), manifest, f"{at}: name"),
                manifest=manifest,
                weight=1.0,
                ratio=ratio,
                max_epochs=_opt_int(e.get("max_epochs"), f"{at}: max_epochs", lo=1),
                group=_group(e.get("type", "default"), f"{at}: type"),
            )
        )
    return out


def _shuffle(doc: Any, at: str) -> ShuffleConfig:
    if isinstance(doc, bool):
        return ShuffleConfig(shards=doc, samples=doc)
    if not isinstance(doc, Mapping):
        raise ValueError(
            f"{at}: must be true/false or a mapping of {{shards, samples, block_size, window_blocks}}"
        )
    _no_unknown(doc, {"shards", "samples", "block_size", "window_blocks"}, at)
    return ShuffleConfig(
        shards=_bool(doc.get("shards", True), f"{at}.shards"),
        samples=_bool(doc.get("samples", True), f"{at}.samples"),
        block_size=_int(doc.get("block_size", 256), f"{at}.block_size", lo=1),
        window_blocks=_int(doc.get("window_blocks", 1), f"{at}.window_blocks", lo=1),
    )


# --- scalar checks ---------------------------------------------------------------------------


def _named(at: str, e: Mapping) -> str:
    name = e.get("name")
    return f"{at} ({name!r})" if isinstance(name, str) else at


def _no_unknown(doc: Mapping, known: set, at: str) -> None:
    extra = sorted(str(k) for k in doc if k not in known)
    if extra:
        raise ValueError(f"{at}: unknown key {extra[0]!r} (known: {', '.join(sorted(known))})")


_REMOTE = ("http", "https", "s3")


def _manifest(v: Any, at: str, base_dir: Optional[str], policy: tuple = (False, [])) -> str:
    allow_pipe, root_sets = policy
    if not isinstance(v, str) or not v.strip():
        raise ValueError(f"{at}: required, the URL or path of a dataset manifest (index.json)")
    if "\0" in v:
        raise ValueError(f"{at}: the path contains a NUL character")
    if v.startswith("pipe:"):
        if not allow_pipe:
            raise ValueError(
                f"{at}: pipe: URLs run a shell command and are refused in a data "
                "config (set 'allow_pipe: true' to accept them)"
            )
        if root_sets:
            raise ValueError(f"{at}: a pipe: URL cannot be checked against allowed_roots")
        return v
    if v.startswith("file://"):
        v = _file_url_path(v, at)
    elif "://" in v:
        scheme = v.split("://", 1)[0].lower()
        if scheme not in _REMOTE:
            raise ValueError(
                f"{at}: unsupported URL scheme {scheme[:20]!r} (use a local path, "
                "file://, http(s):// or s3://)"
            )
        try:
            parts = urlsplit(v)
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            raise ValueError(f"{at}: malformed URL {redact(v)!r}") from None
        if not parts.netloc:
            raise ValueError(f"{at}: {redact(v)!r} names no host or bucket")
    if "://" not in v and base_dir is not None and not os.path.isabs(v):
        v = os.path.normpath(os.path.join(base_dir, v))
    for roots in root_sets:
        if not any(_under(v, r) for r in roots):
            raise ValueError(
                f"{at}: {redact(v)!r} is outside the allowed roots "
                f"({', '.join(redact(r) for r in roots)}); add its folder to "
                "'allowed_roots' to allow it"
            )
    return v


def _file_url_path(v: str, at: str) -> str:
    rest = v[len("file://") :]
    host, sep, path = rest.partition("/")
    if host not in ("", "localhost"):
        raise ValueError(
            f"{at}: file:// URL names another host ({redact(v)!r}); only local "
            "files (file:///path) are accepted"
        )
    if "?" in path or "#" in path:
        raise ValueError(f"{at}: a file:// URL takes no query or fragment: {redact(v)!r}")
    return "/" + path


def _roots(v: Any, at: str, base_dir: Optional[str]) -> Optional[List[str]]:
    if v is None:
        return None
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, (list, tuple)) or not v:
        raise ValueError(f"{at}: must be a non-empty list of folders or URL prefixes")
    out = []
    for i, r in enumerate(v):
        if not isinstance(r, str) or not r.strip() or "\0" in r or r.startswith("pipe:"):
            raise ValueError(f"{at}[{i}]: must be a local folder or an http(s):// or s3:// prefix")
        if r.startswith("file://"):
            r = _file_url_path(r, f"{at}[{i}]")
        if "://" in r:
            scheme = r.split("://", 1)[0].lower()
            if scheme not in _REMOTE:
                raise ValueError(f"{at}[{i}]: unsupported URL scheme {scheme[:20]!r}")
            out.append(r if r.endswith("/") else r + "/")
        else:
            if base_dir is not None and not os.path.isabs(r):
                r = os.path.join(base_dir, r)
            out.append(os.path.realpath(r))
    return out


def _under(v: str, root: str) -> bool:
    if "://" in root:
        if "://" not in v:
            return False
        parts = urlsplit(v)
        if ".." in parts.path.split("/") or parts.username or parts.password:
            return False
        clean = f"{parts.scheme.lower()}://{parts.netloc.lower()}{posixpath.normpath(parts.path or '/')}"
        rparts = urlsplit(root)
        rclean = f"{rparts.scheme.lower()}://{rparts.netloc.lower()}{rparts.path}"
        return (clean + "/").startswith(rclean)
    if "://" in v:
        return False
    real = os.path.realpath(v)
    try:
        return os.path.commonpath([real, root]) == root
    except ValueError:
        return False


def _name(v: Any, manifest: str, at: str) -> str:
    if v is None:
        stem = redact(manifest).rstrip("/")  # never a signature or password in a name
        if stem.endswith(".json"):
            stem = stem.rsplit("/", 1)[0]
        v = re.sub(r"[^A-Za-z0-9_.\-]", "_", stem.rsplit("/", 1)[-1])[-80:] or "dataset"
    if not isinstance(v, str) or not _NAME_RE.match(v):
        raise ValueError(f"{at}: {v!r} must be 1-80 characters from [A-Za-z0-9_.-]")
    return v


def _group(v: Any, at: str) -> str:
    if not isinstance(v, (str, int)) or isinstance(v, bool) or str(v) == "":
        raise ValueError(f"{at}: must be a non-empty string, got {v!r}")
    return str(v)


def _positive(v: Any, at: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or v != v or v == float("inf"):
        raise ValueError(f"{at}: must be a positive finite number, got {v!r}")
    return float(v)


def _int(v: Any, at: str, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{at}: must be an integer >= {lo}, got {v!r}")
    return v


def _opt_int(v: Any, at: str, lo: int) -> Optional[int]:
    return None if v is None else _int(v, at, lo)


def _bool(v: Any, at: str) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"{at}: must be true or false, got {v!r}")
    return v


def _choice(v: Any, choices: tuple, at: str) -> str:
    if v not in choices:
        raise ValueError(f"{at}: must be one of {', '.join(choices)}, got {v!r}")
    return v


def config_summary(cfg: DataConfig) -> Dict[str, Any]:
    """A JSON-able view of the config (for logs and ``wds-tools mix --json``)."""
    return {
        "source": cfg.source,
        "seed": cfg.seed,
        "weight_by": cfg.weight_by,
        "on_error": cfg.on_error,
        "shuffle": vars(cfg.shuffle).copy(),
        "datasets": [
            dict(
                vars(d),
                manifest=redact(d.manifest),
                schedule=None if d.schedule is None else d.schedule.to_json(),
            )
            for d in cfg.datasets
        ],
        **({"allowed_roots": [redact(r) for r in cfg.allowed_roots]} if cfg.allowed_roots else {}),
        **({"allow_pipe": True} if cfg.allow_pipe else {}),
        **({"cache": vars(cfg.cache).copy()} if cfg.cache is not None else {}),
    }

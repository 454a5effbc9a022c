"""Pre-tokenize Lumina-mGPT conversations into format-v1 token shards (one rank of N).

    python -m lumina.pre_tokenize --splits N --rank R --in_filename IN.json --out_dir OUT \\
        --target_size 768 --tokenizer TOK --vq_model VQ

Flags compatible with the reference's ``pre_tokenize.py``. The pipeline, per rank:

1. read this rank's items from ``.json`` or ``.jsonl`` (one file: ``index % splits == rank``;
   several files: by file) or from raw image-text tar shards (by shard), local, HTTP or S3;
2. background worker processes validate, tokenize text and decode/crop images (uint8);
3. the main process encodes images in same-size batches on ``--device`` and splices the blocks;
4. samples go, in input order, to a :class:`wds_tools.writer.ShardWriter`; bad items go to
   ``OUT/errors-rRRRRR.jsonl`` with their index and reason.

Resume: rerunning the same command continues after the last complete shard (its ``cursor`` is
the next input index, and inside a raw shard its byte offset); the incomplete tail is redone, so
the final dataset is the same with no item lost or duplicated. Sample keys are the item index
(``%09d`` for one file, ``%015d`` = source number and position for several files or raw
shards), the same for any ``--splits``.

``--out_dir s3://bucket/prefix`` (or ``--staging_dir``): shards are written to a local staging
folder and each goes up whole with its index (:mod:`wds_tools.store`); a rerun resumes from
what is in the store.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence, Union

from lumina.batching import OrderedBucketEncoder
from lumina.errors_log import ErrorLog, errors_file_name
from lumina.image_processing import DEFAULT_MAX_IMAGE_PIXELS
from lumina.input_items import InputSpec, count_rank_items, iter_inputs
from lumina.item_processing import DEFAULT_TEMPLATE, ItemFailure, ItemPreparer, ItemSettings, assemble
from lumina.text_tokens import ensure_placeholder, lookup_token_id
from lumina.vq_encoder import PIXEL_SCALINGS
from lumina.worker_pool import ordered_map

__all__ = ["PreTokenizeConfig", "RunSummary", "add_arguments", "main", "run", "run_config"]

logger = logging.getLogger("lumina.pre_tokenize")
DEFAULT_CHECKPOINT = "Alpha-VLLM/Lumina-mGPT-7B-768"


@dataclass
class PreTokenizeConfig:
    """All settings of one pre-tokenization rank, validated once."""

    in_filename: Union[str, Sequence[str]]  # paths/URLs or brace patterns of .json/.jsonl/.tar
    out_dir: str  # a folder or s3://bucket/prefix
    splits: int = 1
    rank: int = 0
    tokenizer: str = DEFAULT_CHECKPOINT
    vq_model: str = DEFAULT_CHECKPOINT
    target_size: int = 512
    batch_size: int = 8
    precision: str = "auto"  # bf16 on CUDA (the reference's), fp32 on CPU
    device: str = "auto"
    num_workers: int = 2
    crop: str = "random"
    seed: int = 0
    image_root: Optional[str] = None
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    adapter: Optional[str] = None
    pixel_scaling: str = "lumina"  # x / 255 * 2 - 1, as Lumina-mGPT; or "transformers"
    rescale_factor: Optional[float] = None  # older flag: x * factor - 1 (transformers scaling)
    max_samples_per_shard: int = 1000
    max_shard_bytes: int = 256 << 20
    prefix: str = "shard"
    max_pending: int = 0  # items waiting for their batch; 0 = 8 * batch_size
    progress: bool = True
    template: str = DEFAULT_TEMPLATE  # raw shards: the human turn, from {w}, {h}, {caption}
    caption_key: Optional[str] = None  # raw shards: caption from this .json field (default .txt)
    staging_dir: Optional[str] = None  # local folder for shards before upload (default: temp)

    def __post_init__(self) -> None:
        if self.splits < 1 or not 0 <= self.rank < self.splits:
            raise ValueError(f"--rank must be in [0, --splits={self.splits}), got {self.rank}")
        self.inputs().validate()
        if self.out_dir.startswith(("http://", "https://", "pipe:")):
            raise ValueError(f"--out_dir {self.out_dir!r}: output goes to a local folder or s3://")
        if self.batch_size < 1:
            raise ValueError(f"--batch_size must be >= 1, got {self.batch_size}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"--precision must be fp32, bf16 or auto, not {self.precision!r}")
        if self.num_workers < 0:
            raise ValueError(f"--num_workers must be >= 0, got {self.num_workers}")
        self.item_settings()  # validates crop, target_size

    def item_settings(self) -> ItemSettings:
        return ItemSettings(
            tokenizer=self.tokenizer,
            target_size=self.target_size,
            crop=self.crop,
            seed=self.seed,
            image_root=self.image_root,
            max_image_pixels=self.max_image_pixels,
            adapter=self.adapter,
            template=self.template,
            caption_key=self.caption_key,
        )

    def inputs(self) -> InputSpec:
        return InputSpec(self.in_filename)

    @property
    def staged(self) -> bool:
        """Shards go through a local staging folder to a store (S3, or another folder)."""
        return self.out_dir.startswith("s3://") or self.staging_dir is not None

    def local_dir(self) -> str:
        """Where files are written first: ``out_dir`` itself, or the staging folder."""
        if not self.staged:
            return self.out_dir
        tag = hashlib.sha256(self.out_dir.encode()).hexdigest()[:12]
        return os.path.join(self.staging_dir or tempfile.gettempdir(), f"lumina-pretok-{tag}")

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_precision(self) -> str:
        if self.precision != "auto":
            return self.precision
        return "bf16" if self.resolved_device().startswith("cuda") else "fp32"


@dataclass
class RunSummary:
    """What one rank did; ``total_*`` include work kept from earlier (resumed) runs."""

    rank: int
    splits: int
    source: str
    resumed_from: int
    num_items: int = 0
    num_ok: int = 0
    num_failed: int = 0
    total_ok: int = 0
    total_failed: int = 0
    failures_by_reason: dict = field(default_factory=dict)
    num_images: int = 0
    num_batches: int = 0
    seconds: float = 0.0
    encode_seconds: float = 0.0

    @property
    def items_per_s(self) -> float:
        return self.num_items / self.seconds if self.seconds else 0.0

    @property
    def all_failed(self) -> bool:
        return self.total_ok == 0 and self.total_failed > 0

    def line(self) -> str:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.failures_by_reason.items())) or "none"
        return (
            f"rank {self.rank}/{self.splits}: {self.num_items} items in {self.seconds:.1f}s "
            f"({self.items_per_s:.2f} items/s; encoder busy {self.encode_seconds:.1f}s, "
            f"{self.num_images} images in {self.num_batches} batches); ok {self.num_ok}, failed "
            f"{self.num_failed}; dataset so far: ok {self.total_ok}, failed {self.total_failed} ({reasons})"
        )


def tokenizer_identity(name: str, tokenizer: Any) -> dict:
    """Name (a hub id, or a local folder's base name) and a hash of the vocabulary."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode()
    shown = name if not os.path.isdir(name) else os.path.basename(os.path.normpath(name))
    return {"name": shown, "sha256": hashlib.sha256(vocab).hexdigest()}


def run_config(cfg: PreTokenizeConfig) -> RunSummary:
    """Run one rank to completion (or resume it); return its summary."""
    from transformers import AutoTokenizer

    from lumina.vq_encoder import VQEncoder
    from wds_tools.store import open_store
    from wds_tools.writer import ShardWriter

    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer)
    vocab_size = len(tokenizer)  # before the placeholder, which is never stored
    ensure_placeholder(tokenizer)
    placeholder = lookup_token_id(tokenizer, "<|image|>")
    device, precision = cfg.resolved_device(), cfg.resolved_precision()
    encoder = VQEncoder.from_pretrained(
        cfg.vq_model,
        tokenizer,
        device=device,
        precision=precision,
        pixel_scaling=cfg.pixel_scaling,
        rescale_factor=cfg.rescale_factor,
    )
    spec = cfg.inputs()
    source = spec.source_name()
    local_dir = cfg.local_dir()
    store = open_store(cfg.out_dir) if cfg.staged else None
    writer = ShardWriter(
        local_dir,
        vocab_size=vocab_size,
        rank=cfg.rank,
        world_size=cfg.splits,
        prefix=cfg.prefix,
        max_samples=cfg.max_samples_per_shard,
        max_bytes=cfg.max_shard_bytes,
        tokenizer=tokenizer_identity(cfg.tokenizer, tokenizer),
        resume=True,
        increasing_keys=True,  # keys follow the input index: no set of every key in memory
        store=store,
    )
    start = writer.resume_cursor
    errors_path = os.path.join(local_dir, errors_file_name(cfg.rank))
    if store is not None:
        _restore_errors(cfg, store, errors_path)
    errors = ErrorLog(errors_path, keep_below=start, source=source)
    if store is not None:  # each shard goes up with the errors of the items before its cursor
        writer.before_publish = lambda name: [
            p for p in [errors.take_new(os.path.join(local_dir, name[: -len(".tar")] + ".errors.jsonl"))] if p
        ]
    summary = RunSummary(rank=cfg.rank, splits=cfg.splits, source=source, resumed_from=start)
    if start:
        logger.info(
            "rank %d: resuming at input index %d (%d samples kept)", cfg.rank, start, writer.num_samples
        )
    try:
        _process(cfg, spec, writer, errors, encoder, placeholder, summary)
        writer.finish_shard()
    except BaseException:
        writer.abort()  # complete shards stay; the rerun redoes the tail
        errors.close()
        raise
    summary.total_ok, summary.total_failed = writer.num_samples, errors.num_failed
    summary.failures_by_reason = dict(errors.by_reason)
    errors.close()
    if store is not None:  # the whole errors file, then the done-marker last
        store.put(errors_path, errors_file_name(cfg.rank))
        os.remove(errors_path)
    writer.close(extra=_marker_extra(cfg, summary, precision))
    return summary


def _restore_errors(cfg: PreTokenizeConfig, store, errors_path: str) -> None:
    """The local errors file rebuilt from the per-shard pieces of committed shards (the writer
    has already deleted the pieces of shards that never went up)."""
    os.makedirs(os.path.dirname(errors_path), exist_ok=True)
    with open(errors_path, "wb") as out:
        for name, _ in store.list(f"{cfg.prefix}-r{cfg.rank:05d}-"):
            if name.endswith(".errors.jsonl"):
                out.write(store.read_bytes(name))


def _process(cfg, spec, writer, errors, encoder, placeholder, summary) -> None:
    from tqdm import tqdm

    batcher = OrderedBucketEncoder(
        encoder.encode_blocks, cfg.batch_size, cfg.max_pending or 8 * cfg.batch_size
    )
    items = iter_inputs(spec, cfg.splits, cfg.rank, start=writer.resume_cursor, state=writer.resume_state)
    key_format = "{:015d}" if spec.multi else "{:09d}"
    total = _num_items(cfg, spec)
    prepared = ordered_map(ItemPreparer, cfg.item_settings(), items, cfg.num_workers)
    bar = tqdm(
        total=total, unit="item", desc=f"rank {cfg.rank}", disable=not cfg.progress, dynamic_ncols=True
    )
    t0 = time.perf_counter()

    def emit(results) -> None:
        for item, blocks in results:
            _emit_one(item, blocks, writer, errors, placeholder, summary, key_format)
            bar.update(1)
            bar.set_postfix(failed=summary.num_failed, refresh=False)

    for result in prepared:
        emit(batcher.add(result))
    emit(batcher.flush())
    bar.close()
    summary.seconds = time.perf_counter() - t0
    summary.encode_seconds, summary.num_images, summary.num_batches = (
        batcher.encode_seconds,
        batcher.num_images,
        batcher.num_batches,
    )


def _emit_one(item, blocks, writer, errors, placeholder, summary, key_format="{:09d}") -> None:
    summary.num_items += 1
    if isinstance(item, ItemFailure):
        errors.write(item.to_json())
        summary.num_failed += 1
    else:
        input_ids, labels, meta = assemble(item, blocks, placeholder, summary.source)
        writer.write(key_format.format(item.index), input_ids, labels=labels, meta=meta)
        summary.num_ok += 1
    writer.cursor = item.next_cursor if item.next_cursor is not None else item.index + 1
    writer.cursor_state = item.cursor_state


def _num_items(cfg: PreTokenizeConfig, spec: InputSpec) -> Optional[int]:
    """This rank's item count for the progress bar (local ``.jsonl`` only: a ``.json`` list is
    not parsed twice, remote and raw inputs are not read twice)."""
    if cfg.progress:
        return count_rank_items(spec, cfg.splits, cfg.rank)
    return None


def _marker_extra(cfg: PreTokenizeConfig, summary: RunSummary, precision: str) -> dict:
    return {
        "num_failed": summary.total_failed,
        "failures_by_reason": summary.failures_by_reason,
        "source": summary.source,
        "errors_file": errors_file_name(cfg.rank),
        "target_size": cfg.target_size,
        "crop": cfg.crop,
        "seed": cfg.seed,
        "precision": precision,
        "pixel_scaling": cfg.pixel_scaling
        if cfg.rescale_factor is None
        else f"transformers x{cfg.rescale_factor}",
    }


# ----------------------------------------------------------------------------------------------
# Command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The reference's flags plus this project's; shared by ``lumina pre-tokenize``."""
    p.add_argument(
        "--splits",
        type=int,
        default=1,
        help="number of ranks the input is split into (item i -> rank i %% splits)",
    )
    p.add_argument("--rank", type=int, default=0, help="this process's rank, 0 <= rank < splits")
    p.add_argument(
        "--in_filename",
        required=True,
        nargs="+",
        help="inputs: a .json list or .jsonl file (split by item), several of them or a brace pattern (split by file), or raw image-text tar shards (URLs or brace patterns, local, https://, s3://; split by shard)",
    )
    p.add_argument(
        "--out_dir",
        required=True,
        help="output folder or s3://bucket/prefix for shards, indexes and errors-r*.jsonl",
    )
    p.add_argument(
        "--staging_dir",
        default=None,
        help="local folder where shards are written before they go up whole (default for s3:// output: the temp folder)",
    )
    p.add_argument(
        "--template",
        default=DEFAULT_TEMPLATE,
        help="raw shards: the human turn, with {w}x{h} (the crop's size) and {caption} (default: Lumina-mGPT's generation prompt)",
    )
    p.add_argument(
        "--caption_key",
        default=None,
        help="raw shards: take the caption from this field of KEY.json (default: KEY.txt, else the json's 'caption')",
    )
    p.add_argument(
        "--target_size",
        type=int,
        default=512,
        help="image target size T (512, 768, 1024); crops have area near T^2",
    )
    p.add_argument("--tokenizer", default=DEFAULT_CHECKPOINT, help="text tokenizer: local folder or hub id")
    p.add_argument(
        "--vq_model",
        default=DEFAULT_CHECKPOINT,
        help="Chameleon checkpoint (full model or ChameleonVQVAE): folder or hub id",
    )
    p.add_argument("--batch_size", type=int, default=8, help="images of one crop size encoded together")
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="VQ encoder precision (auto: bf16 on CUDA as the reference, fp32 on CPU)",
    )
    p.add_argument("--device", default="auto", help="encoder device: auto, cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--num_workers",
        type=int,
        default=2,
        help="background processes decoding and cropping images (0 = inline)",
    )
    p.add_argument(
        "--crop",
        choices=["random", "center"],
        default="random",
        help="crop offset: random (seeded per item) or center",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the per-item crop offsets")
    p.add_argument(
        "--image_root",
        default=None,
        help="folder that relative image paths are relative to (default: the current directory)",
    )
    p.add_argument(
        "--max_image_pixels",
        type=int,
        default=DEFAULT_MAX_IMAGE_PIXELS,
        help="images with more pixels are bad items (decompression-bomb guard)",
    )
    p.add_argument(
        "--adapter",
        default=None,
        help="module:function converting your item format to the standard one (see lumina.conversation.to_standard_item)",
    )
    p.add_argument(
        "--pixel_scaling",
        choices=PIXEL_SCALINGS,
        default="lumina",
        help="pixels to encoder input: lumina = x / 255 * 2 - 1, exactly [-1, 1], as Lumina-mGPT's own image tokenizer; transformers = x * 0.0078 - 1, as ChameleonImageProcessor (white is 0.989)",
    )
    p.add_argument(
        "--rescale_factor",
        type=float,
        default=None,
        help="transformers scaling with this factor: x * F - 1 (implies --pixel_scaling transformers; kept for compatibility)",
    )
    p.add_argument(
        "--max_samples_per_shard", type=int, default=1000, help="a shard is completed at this many samples"
    )
    p.add_argument("--max_shard_mb", type=float, default=256, help="... or at this many MiB")
    p.add_argument("--prefix", default="shard", help="shard file name prefix")
    p.add_argument(
        "--max_pending", type=int, default=0, help="items that may wait for a full batch (0 = 8 x batch_size)"
    )
    p.add_argument("--no_progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> PreTokenizeConfig:
    inputs = [args.in_filename] if isinstance(args.in_filename, str) else list(args.in_filename)
    return PreTokenizeConfig(
        in_filename=inputs[0] if len(inputs) == 1 else inputs,
        out_dir=args.out_dir,
        splits=args.splits,
        rank=args.rank,
        tokenizer=args.tokenizer,
        vq_model=args.vq_model,
        target_size=args.target_size,
        batch_size=args.batch_size,
        precision=args.precision,
        device=args.device,
        num_workers=args.num_workers,
        crop=args.crop,
        seed=args.seed,
        image_root=args.image_root,
        max_image_pixels=args.max_image_pixels,
        adapter=args.adapter,
        rescale_factor=args.rescale_factor,
        pixel_scaling=args.pixel_scaling,
        max_samples_per_shard=args.max_samples_per_shard,
        max_shard_bytes=int(args.max_shard_mb * (1 << 20)),
        prefix=args.prefix,
        max_pending=args.max_pending,
        progress=not args.no_progress,
        template=args.template.replace("\\n", "\n"),
        caption_key=args.caption_key,
        staging_dir=args.staging_dir,
    )


def run(args: argparse.Namespace) -> int:
    """Run from parsed arguments; exit status 1 if every item failed."""
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    logging.getLogger("botocore").setLevel(logging.WARNING)  # not every credential lookup
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = run_config(cfg)
    print(summary.line(), file=sys.stderr)
    _write_summary(cfg, summary)
    if summary.all_failed:
        print(
            f"error: every item of rank {cfg.rank} failed; see {errors_file_name(cfg.rank)}", file=sys.stderr
        )
        return 1
    return 0


def _write_summary(cfg: PreTokenizeConfig, summary: RunSummary) -> None:
    name = f"summary-r{cfg.rank:05d}.json"
    path = os.path.join(cfg.local_dir(), name)
    with open(path, "w") as f:
        json.dump({**asdict(summary), "items_per_s": summary.items_per_s}, f, indent=1)
    if cfg.staged:
        from wds_tools.store import open_store

        open_store(cfg.out_dir).put(path, name)
        os.remove(path)


def main(argv: Optional[list[str]] = None) -> int:
    """Console script ``lumina-pre-tokenize``."""
    parser = argparse.ArgumentParser(prog="lumina-pre-tokenize", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

"""Pre-tokenize Lumina-mGPT conversations into format-v1 token shards (one rank of N).

    python -m lumina.pre_tokenize --splits N --rank R --in_filename IN.json --out_dir OUT \\
        --target_size 768 --tokenizer TOK --vq_model VQ

Flags compatible with the reference's ``pre_tokenize.py``. The pipeline, per rank:

1. read this rank's items (``index % splits == rank``) from ``.json`` or ``.jsonl``;
2. background worker processes validate, tokenize text and decode/crop images (uint8);
3. the main process encodes images in same-size batches on ``--device`` and splices the blocks;
4. samples go, in input order, to a :class:`wds_tools.writer.ShardWriter`; bad items go to
   ``OUT/errors-rRRRRR.jsonl`` with their index and reason.

Resume: rerunning the same command continues after the last complete shard (its ``cursor`` is
the next input index); the incomplete tail is redone, so the final dataset is the same with no
item lost or duplicated. Sample keys are the item index (``%09d``), the same for any ``--splits``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from lumina.batching import OrderedBucketEncoder
from lumina.errors_log import ErrorLog, errors_file_name
from lumina.image_processing import DEFAULT_MAX_IMAGE_PIXELS
from lumina.input_items import count_rank_items, iter_rank_items
from lumina.item_processing import ItemFailure, ItemPreparer, ItemSettings, assemble
from lumina.text_tokens import ensure_placeholder, lookup_token_id
from lumina.vq_encoder import REFERENCE_RESCALE_FACTOR
from lumina.worker_pool import ordered_map

__all__ = ["PreTokenizeConfig", "RunSummary", "add_arguments", "main", "run", "run_config"]

logger = logging.getLogger("lumina.pre_tokenize")
DEFAULT_CHECKPOINT = "Alpha-VLLM/Lumina-mGPT-7B-768"


@dataclass
class PreTokenizeConfig:
    """All settings of one pre-tokenization rank, validated once."""

    in_filename: str
    out_dir: str
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
    rescale_factor: float = REFERENCE_RESCALE_FACTOR
    max_samples_per_shard: int = 1000
    max_shard_bytes: int = 256 << 20
    prefix: str = "shard"
    max_pending: int = 0  # items waiting for their batch; 0 = 8 * batch_size
    progress: bool = True

    def __post_init__(self) -> None:
        if self.splits < 1 or not 0 <= self.rank < self.splits:
            raise ValueError(f"--rank must be in [0, --splits={self.splits}), got {self.rank}")
        if not os.path.isfile(self.in_filename):
            raise ValueError(f"--in_filename {self.in_filename!r}: no such file")
        if not self.in_filename.endswith((".json", ".jsonl")):
            raise ValueError(f"--in_filename {self.in_filename!r}: expected a .json list or a .jsonl file")
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
        )

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
    from wds_tools.writer import ShardWriter

    from lumina.vq_encoder import VQEncoder

    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer)
    vocab_size = len(tokenizer)  # before the placeholder, which is never stored
    ensure_placeholder(tokenizer)
    placeholder = lookup_token_id(tokenizer, "<|image|>")
    device, precision = cfg.resolved_device(), cfg.resolved_precision()
    encoder = VQEncoder.from_pretrained(
        cfg.vq_model, tokenizer, device=device, precision=precision, rescale_factor=cfg.rescale_factor
    )
    source = os.path.basename(cfg.in_filename)
    writer = ShardWriter(
        cfg.out_dir,
        vocab_size=vocab_size,
        rank=cfg.rank,
        world_size=cfg.splits,
        prefix=cfg.prefix,
        max_samples=cfg.max_samples_per_shard,
        max_bytes=cfg.max_shard_bytes,
        tokenizer=tokenizer_identity(cfg.tokenizer, tokenizer),
        resume=True,
    )
    start = writer.resume_cursor
    errors = ErrorLog(os.path.join(cfg.out_dir, errors_file_name(cfg.rank)), keep_below=start, source=source)
    summary = RunSummary(rank=cfg.rank, splits=cfg.splits, source=source, resumed_from=start)
    if start:
        logger.info("rank %d: resuming at input index %d (%d samples kept)", cfg.rank, start, writer.num_samples)
    try:
        _process(cfg, writer, errors, encoder, placeholder, summary)
    except BaseException:
        writer.abort()  # complete shards stay; the rerun redoes the tail
        errors.close()
        raise
    summary.total_ok, summary.total_failed = writer.num_samples, errors.num_failed
    summary.failures_by_reason = dict(errors.by_reason)
    writer.close(extra=_marker_extra(cfg, summary, precision))
    errors.close()
    return summary


def _process(cfg, writer, errors, encoder, placeholder, summary) -> None:
    from tqdm import tqdm

    batcher = OrderedBucketEncoder(encoder.encode_blocks, cfg.batch_size, cfg.max_pending or 8 * cfg.batch_size)
    items = iter_rank_items(cfg.in_filename, cfg.splits, cfg.rank, start=writer.resume_cursor)
    total = _num_items(cfg)
    prepared = ordered_map(ItemPreparer, cfg.item_settings(), items, cfg.num_workers)
    bar = tqdm(total=total, unit="item", desc=f"rank {cfg.rank}", disable=not cfg.progress, dynamic_ncols=True)
    t0 = time.perf_counter()

    def emit(results) -> None:
        for item, blocks in results:
            _emit_one(item, blocks, writer, errors, placeholder, summary)
            bar.update(1)
            bar.set_postfix(failed=summary.num_failed, refresh=False)

    for result in prepared:
        emit(batcher.add(result))
    emit(batcher.flush())
    bar.close()
    summary.seconds = time.perf_counter() - t0
    summary.encode_seconds, summary.num_images, summary.num_batches = (
        batcher.encode_seconds, batcher.num_images, batcher.num_batches
    )


def _emit_one(item, blocks, writer, errors, placeholder, summary) -> None:
    summary.num_items += 1
    if isinstance(item, ItemFailure):
        errors.write(item.to_json())
        summary.num_failed += 1
    else:
        input_ids, labels, meta = assemble(item, blocks, placeholder, summary.source)
        writer.write(f"{item.index:09d}", input_ids, labels=labels, meta=meta)
        summary.num_ok += 1
    writer.cursor = item.index + 1


def _num_items(cfg: PreTokenizeConfig) -> Optional[int]:
    """This rank's item count for the progress bar (``.jsonl`` only: a ``.json`` list is not parsed twice)."""
    if cfg.progress and cfg.in_filename.endswith(".jsonl"):
        return count_rank_items(cfg.in_filename, cfg.splits, cfg.rank)
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
    }


# ----------------------------------------------------------------------------------------------
# Command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The reference's flags plus this project's; shared by ``lumina pre-tokenize``."""
    p.add_argument("--splits", type=int, default=1, help="number of ranks the input is split into (item i -> rank i %% splits)")
    p.add_argument("--rank", type=int, default=0, help="this process's rank, 0 <= rank < splits")
    p.add_argument("--in_filename", required=True, help="input items: a .json list or a .jsonl file")
    p.add_argument("--out_dir", required=True, help="output folder for shards, indexes and errors-r*.jsonl")
    p.add_argument("--target_size", type=int, default=512, help="image target size T (512, 768, 1024); crops have area near T^2")
    p.add_argument("--tokenizer", default=DEFAULT_CHECKPOINT, help="text tokenizer: local folder or hub id")
    p.add_argument("--vq_model", default=DEFAULT_CHECKPOINT, help="Chameleon checkpoint (full model or ChameleonVQVAE): folder or hub id")
    p.add_argument("--batch_size", type=int, default=8, help="images of one crop size encoded together")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto", help="VQ encoder precision (auto: bf16 on CUDA as the reference, fp32 on CPU)")
    p.add_argument("--device", default="auto", help="encoder device: auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--num_workers", type=int, default=2, help="background processes decoding and cropping images (0 = inline)")
    p.add_argument("--crop", choices=["random", "center"], default="random", help="crop offset: random (seeded per item) or center")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-item crop offsets")
    p.add_argument("--image_root", default=None, help="folder that relative image paths are relative to (default: the current directory)")
    p.add_argument("--max_image_pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS, help="images with more pixels are bad items (decompression-bomb guard)")
    p.add_argument("--adapter", default=None, help="module:function converting your item format to the standard one (see lumina.conversation.to_standard_item)")
    p.add_argument("--rescale_factor", type=float, default=REFERENCE_RESCALE_FACTOR, help="pixel scale before -1 (reference: 0.0078, as ChameleonImageProcessor)")
    p.add_argument("--max_samples_per_shard", type=int, default=1000, help="a shard is completed at this many samples")
    p.add_argument("--max_shard_mb", type=float, default=256, help="... or at this many MiB")
    p.add_argument("--prefix", default="shard", help="shard file name prefix")
    p.add_argument("--max_pending", type=int, default=0, help="items that may wait for a full batch (0 = 8 x batch_size)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> PreTokenizeConfig:
    return PreTokenizeConfig(
        in_filename=args.in_filename, out_dir=args.out_dir, splits=args.splits, rank=args.rank,
        tokenizer=args.tokenizer, vq_model=args.vq_model, target_size=args.target_size,
        batch_size=args.batch_size, precision=args.precision, device=args.device,
        num_workers=args.num_workers, crop=args.crop, seed=args.seed, image_root=args.image_root,
        max_image_pixels=args.max_image_pixels, adapter=args.adapter, rescale_factor=args.rescale_factor,
        max_samples_per_shard=args.max_samples_per_shard, max_shard_bytes=int(args.max_shard_mb * (1 << 20)),
        prefix=args.prefix, max_pending=args.max_pending, progress=not args.no_progress,
    )


def run(args: argparse.Namespace) -> int:
    """Run from parsed arguments; exit status 1 if every item failed."""
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = run_config(cfg)
    print(summary.line(), file=sys.stderr)
    summary_path = os.path.join(cfg.out_dir, f"summary-r{cfg.rank:05d}.json")
    with open(summary_path, "w") as f:
        json.dump(asdict(summary) | {"items_per_s": summary.items_per_s}, f, indent=1)
    if summary.all_failed:
        print(f"error: every item of rank {cfg.rank} failed; see {errors_file_name(cfg.rank)}", file=sys.stderr)
        return 1
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """Console script ``lumina-pre-tokenize``."""
    parser = argparse.ArgumentParser(prog="lumina-pre-tokenize", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

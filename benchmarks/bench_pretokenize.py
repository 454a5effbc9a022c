"""Benchmark pre-tokenization: end-to-end items/s, and batched vs batch-1 fp32 VQ encoding.

    python benchmarks/bench_pretokenize.py                       # CPU, tiny VQ, T=256
    python benchmarks/bench_pretokenize.py --device cuda --vq_config real --target_size 768 \\
        --precision bf16 --num_items 256 --batch_size 16 --num_workers 8

``--vq_config real`` builds Chameleon's real-size VQ architecture with random weights (the
timings are those of the real encoder; the codes are meaningless). Items are the bundled demo
photos (text-to-image and VQA conversations), repeated to ``--num_items``. The encoder rows
time the same crops three ways in one run: batch 1 in fp32 (the reference's way, one image per
call), and batched in fp32 and in ``--precision``; "codes equal" is the fraction of VQ codes the
batched encoding shares with batch-1 fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lumina.image_processing import crop_size_list, prepare_image  # noqa: E402
from lumina.pre_tokenize import PreTokenizeConfig, run_config  # noqa: E402
from lumina.tiny import build_tiny_chameleon, build_tiny_tokenizer  # noqa: E402

DEMO = REPO / "lumina" / "assets" / "demo"


def build_artifacts(root: Path, vq_config: str) -> tuple[str, str]:
    tok = build_tiny_tokenizer(str(root / "tokenizer"), num_image_tokens=8192 if vq_config == "real" else 512)
    model = build_tiny_chameleon(
        str(root / "model"), tok, **({"vq_config": "real"} if vq_config == "real" else {})
    )
    return tok, model


def build_items(path: Path, num_items: int) -> str:
    base = json.loads((DEMO / "captions.json").read_text()) + json.loads((DEMO / "vqa.json").read_text())
    items = [base[i % len(base)] for i in range(num_items)]
    path.write_text(json.dumps(items))
    return str(path)


def end_to_end(args, tok: str, model: str, in_file: str, out_dir: Path) -> dict:
    cfg = PreTokenizeConfig(
        in_filename=in_file,
        out_dir=str(out_dir),
        tokenizer=tok,
        vq_model=model,
        target_size=args.target_size,
        batch_size=args.batch_size,
        precision=args.precision,
        device=args.device,
        num_workers=args.num_workers,
        image_root=str(DEMO),
        progress=False,
    )
    s = run_config(cfg)
    return {
        "items": s.num_items,
        "images": s.num_images,
        "seconds": s.seconds,
        "items_per_s": s.items_per_s,
        "encode_seconds": s.encode_seconds,
        "failed": s.num_failed,
    }


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def encoder_rows(args, tok: str, model: str) -> list[dict]:
    """Same crops (the square bucket of T), timed batch-1 fp32 vs batched fp32 vs batched --precision."""
    from transformers import AutoTokenizer

    from lumina.vq_encoder import VQEncoder

    sizes = crop_size_list(args.target_size)
    photos = sorted(DEMO.glob("*.jpg"))
    crops = [
        prepare_image(str(photos[i % len(photos)]), [(args.target_size, args.target_size)], None).pixels
        for i in range(args.encoder_images)
    ]
    assert crops[0].shape[:2] == (args.target_size, args.target_size) and (args.target_size,) * 2 in sizes
    tokenizer = AutoTokenizer.from_pretrained(tok)
    rows, reference_codes = [], None
    chosen = (
        args.precision if args.precision != "auto" else ("bf16" if args.device.startswith("cuda") else "fp32")
    )
    variants = [
        ("batch 1, fp32 (reference)", "fp32", 1),
        (f"batch {args.batch_size}, fp32", "fp32", args.batch_size),
    ]
    if chosen != "fp32":
        variants.append((f"batch {args.batch_size}, {chosen}", chosen, args.batch_size))
    for label, precision, batch in variants:
        enc = VQEncoder.from_pretrained(model, tokenizer, device=args.device, precision=precision)
        enc.encode_codes(crops[:batch])  # warm-up
        _sync(args.device)
        t0 = time.perf_counter()
        codes = np.concatenate([enc.encode_codes(crops[i : i + batch]) for i in range(0, len(crops), batch)])
        _sync(args.device)
        seconds = time.perf_counter() - t0
        reference_codes = codes if reference_codes is None else reference_codes
        rows.append(
            {
                "encoder": label,
                "precision": precision,
                "images": len(crops),
                "seconds": seconds,
                "images_per_s": len(crops) / seconds,
                "codes_equal": float((codes == reference_codes).mean()),
            }
        )
    base = rows[0]["images_per_s"]
    for r in rows:
        r["speedup"] = r["images_per_s"] / base
    return rows


def table(args, e2e: dict, rows: list[dict]) -> str:
    lines = [
        f"device={args.device} vq_config={args.vq_config} target_size={args.target_size} "
        f"batch_size={args.batch_size} num_workers={args.num_workers} precision={args.precision}",
        "",
        "| measurement | images | seconds | rate | speedup | codes equal |",
        "|---|---:|---:|---:|---:|---:|",
        f"| end to end ({e2e['items']} items) | {e2e['images']} | {e2e['seconds']:.2f} | "
        f"{e2e['items_per_s']:.2f} items/s | | |",
    ]
    for r in rows:
        lines.append(
            f"| encoder: {r['encoder']} | {r['images']} | {r['seconds']:.2f} | "
            f"{r['images_per_s']:.2f} images/s | {r['speedup']:.2f}x | {r['codes_equal']:.4f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--vq_config",
        choices=["tiny", "real"],
        default="tiny",
        help="tiny VQ, or the real-size architecture (random weights)",
    )
    p.add_argument("--target_size", type=int, default=256, help="image target size T")
    p.add_argument("--num_items", type=int, default=48, help="items in the end-to-end run")
    p.add_argument("--encoder_images", type=int, default=32, help="crops in the encoder comparison")
    p.add_argument("--batch_size", type=int, default=8, help="batched encoder batch size")
    p.add_argument("--num_workers", type=int, default=2, help="prep worker processes in the end-to-end run")
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="end-to-end and batched-encoder precision",
    )
    p.add_argument("--keep", default=None, help="keep the artifacts and output in this folder")
    args = p.parse_args(argv)
    root = Path(args.keep or tempfile.mkdtemp(prefix="bench_pretok_"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        tok, model = build_artifacts(root, args.vq_config)
        in_file = build_items(root / "items.json", args.num_items)
        shutil.rmtree(root / "out", ignore_errors=True)
        e2e = end_to_end(args, tok, model, in_file, root / "out")
        rows = encoder_rows(args, tok, model)
        print(table(args, e2e, rows))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())

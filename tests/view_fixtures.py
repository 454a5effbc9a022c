"""A tiny tokenizer, a tiny multimodal dataset and a test renderer for the viewer tests.

- ``build_tokenizer(dir)``: a byte-level BPE ``tokenizer.json`` (``tokenizers`` only, trained in
  a second on a few lines) with Chameleon-like special tokens.
- ``make_view_dataset(root, tok_dir)``: conversations with image blocks laid out as Lumina's
  (``<racm3:break> <grid h> <grid w>``, rows of codes each ended by ``<reserved08799>``,
  ``<eoss>``), prompts masked, answers trained, one sample whose text and metadata hold
  ``<script>`` payloads.
- ``GrayRenderer`` / ``load_gray_renderer``: a model-agnostic renderer for ``--renderer``
  (``view_fixtures:load_gray_renderer``) that draws each code as a gray cell of ``cell`` pixels,
  so the PNG has the block's ``w`` x ``h`` pixels when ``cell`` is 16.
"""

from __future__ import annotations

import atexit
import functools
import io
import os
import shutil
import tempfile
from typing import Dict, List, Tuple

import numpy as np

SPECIALS = [
    "<s>",
    "</s>",
    "<pad>",
    "<racm3:break>",
    "<eoss>",
    "<reserved08799>",
    "<reserved08800>",
    "<reserved08801>",
    "<reserved08802>",
    "<reserved08803>",
    "<|image|>",
]
NUM_CODES = 256
CORPUS = """What is in the picture? A red square on a gray field.
Describe the image in one sentence. Two shapes, a circle and a line.
The quick brown fox jumps over the lazy dog. Numbers 0123456789 and <tags> too.
User: Assistant: Human: GPT: script window title document pwned"""
HOSTILE = "<script>window.__pwned=1;document.title='pwned'</script>"
NUM_SAMPLES = 12
SHARD_SIZE = 5  # shards of 5, 5, 2 samples


def build_tokenizer(out_dir: str) -> str:
    """``out_dir/tokenizer.json``; code tokens ``<img0>..<img255>`` come after the specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = SPECIALS + [f"<img{i}>" for i in range(NUM_CODES)]
    trainer = trainers.BpeTrainer(
        vocab_size=len(specials) + 400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines() * 3, trainer=trainer)
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    return out_dir


def image_block(tok, rows: int, cols: int, seed: int) -> np.ndarray:
    """Lumina's block layout around ``rows x cols`` codes (a diagonal gradient plus noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:cols]
    codes = (yy * 7 + xx * 11 + seed * 29 + rng.integers(0, 8, (rows, cols))) % NUM_CODES
    code_ids = np.vectorize(lambda c: tok.token_to_id(f"<img{c}>"))(codes)
    row_end = tok.token_to_id("<reserved08799>")
    grid = np.concatenate([code_ids, np.full((rows, 1), row_end)], axis=1).reshape(-1)
    head = [
        tok.token_to_id("<racm3:break>"),
        tok.token_to_id("<reserved08801>"),
        tok.token_to_id("<reserved08801>"),
    ]
    return np.concatenate([head, grid, [tok.token_to_id("<eoss>")]]).astype(np.int64)


def make_view_dataset(root: str, tok_dir: str, name: str = "pics") -> str:
    """``root/name``: ``NUM_SAMPLES`` conversations, samples ``i % 3 == 1`` with one 4x6-token
    image in the prompt, ``i % 3 == 2`` with a 6x6 image answer; sample ``pics-0007`` carries
    the ``HOSTILE`` text in its answer and metadata. Returns the manifest path."""
    from tokenizers import Tokenizer

    from wds_tools.merge import merge
    from wds_tools.writer import ShardWriter

    tok = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))
    out = os.path.join(root, name)
    bos = tok.token_to_id("<s>")
    with ShardWriter(
        out, vocab_size=tok.get_vocab_size(), max_samples=SHARD_SIZE, tokenizer="view-test-bpe"
    ) as w:
        for i in range(NUM_SAMPLES):
            answer = HOSTILE if i == 7 else f"A red square number {i}."
            parts: List[np.ndarray] = [np.array([bos])]
            sup: List[np.ndarray] = [np.array([False])]
            images: List[Dict] = []

            def add(ids, trained: bool, parts=parts, sup=sup) -> None:
                parts.append(np.asarray(ids, np.int64))
                sup.append(np.full(len(ids), trained))

            add(tok.encode(f"User: What is in the picture {i}? ").ids, False)
            if i % 3 == 1:
                rows, cols = 4, 6
                blk = image_block(tok, rows, cols, i)
                images.append(_block_meta(sum(len(p) for p in parts), blk, rows, cols))
                add(blk, False)
            add(tok.encode(" Assistant: ").ids, False)
            if i % 3 == 2:
                rows, cols = 6, 6
                blk = image_block(tok, rows, cols, i)
                images.append(_block_meta(sum(len(p) for p in parts), blk, rows, cols))
                add(blk, True)
            add(tok.encode(answer).ids + [tok.token_to_id("</s>")], True)
            ids = np.concatenate(parts)
            labels = np.where(np.concatenate(sup), ids, -100)
            meta = {"source": "conv.jsonl", "index": i, "id": f"item-{i:03d}", "images": images}
            if i == 7:
                meta.update(id=HOSTILE, source=f"{HOSTILE}.jsonl")
            w.write(f"{name}-{i:04d}", ids, labels=labels, meta=meta)
    merge(out)
    return os.path.join(out, "index.json")


def _block_meta(offset: int, blk: np.ndarray, rows: int, cols: int) -> Dict:
    h, w = rows * 16, cols * 16
    return {
        "offset": int(offset),
        "num_tokens": int(len(blk)),
        "h": h,
        "w": w,
        "grid": [rows, cols],
        "crop": [8, 4, 8 + w, 4 + h],
        "resized_size": [w + 16, h + 8],
        "orig_size": [2 * w + 32, 2 * h + 16],
    }


class GrayRenderer:
    """Draws a block's codes (Lumina layout: 3 head tokens, rows of codes + row end, end token)
    as gray cells of ``cell`` x ``cell`` pixels; counts its calls."""

    def __init__(self, cell: int = 16):
        self.cell, self.calls = cell, 0

    def render(self, input_ids: np.ndarray, block: dict) -> bytes:
        from PIL import Image

        self.calls += 1
        rows, cols = block["grid"]
        toks = np.asarray(input_ids)[block["offset"] : block["offset"] + block["num_tokens"]]
        codes = toks[3:-1].reshape(rows, cols + 1)[:, :cols].astype(np.int64)
        gray = (codes * 37 % 256).astype(np.uint8)
        img = Image.fromarray(np.kron(gray, np.ones((self.cell, self.cell), np.uint8)), "L")
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()


def load_gray_renderer(arg: str = "16") -> GrayRenderer:
    """``--renderer view_fixtures:load_gray_renderer --renderer-arg CELL_PIXELS``."""
    return GrayRenderer(int(arg))


# --- the real tiny renderer (lumina make-tiny's VQGAN) -----------------------------------------

PHOTO_CAPTIONS = {
    "astronaut": "An astronaut in an orange suit in front of a flag.",
    "chelsea": "A tabby cat looking to the side.",
    "coffee": "A cup of coffee on a saucer.",
}


@functools.lru_cache(maxsize=None)
def tiny_lumina_dataset() -> Tuple[str, str]:
    """``(manifest, tiny_root)``: ``lumina make-tiny`` in a temp folder (removed at exit), then
    one caption sample per photo of ``PHOTO_CAPTIONS``: the photo (as the demo crops it,
    256 px) encoded by the tiny VQGAN into Lumina's block layout, the caption trained. Built
    once per test process. Skips the calling test when ``lumina.render`` or make-tiny's
    ``vq/`` is not there."""
    import pytest
    from tokenizers import Tokenizer

    render = pytest.importorskip("lumina.render", reason="lumina.render is not there")
    import torch

    from lumina import tiny
    from lumina.vqgan import load_vqgan
    from wds_tools.merge import merge
    from wds_tools.writer import ShardWriter

    root = tempfile.mkdtemp(prefix="view_tiny_")
    atexit.register(shutil.rmtree, root, True)
    tiny.main(["--out", root])
    vq = os.path.join(root, "vq")
    if not os.path.isfile(os.path.join(vq, "vqgan.yaml")):
        pytest.skip("lumina make-tiny wrote no vq/ decoder")
    model = load_vqgan(os.path.join(vq, "vqgan.yaml"), os.path.join(vq, "vqgan.ckpt"))
    vocab = render.read_vocabulary(vq)
    tok = Tokenizer.from_file(os.path.join(root, "tokenizer", "tokenizer.json"))
    names = sorted(n[:-4] for n in os.listdir(tiny.DEMO_PHOTOS) if n.endswith(".jpg"))
    crops = dict(zip(names, tiny.demo_photo_crops(256)))
    out = os.path.join(root, "photos")
    with ShardWriter(out, vocab_size=tok.get_vocab_size(), max_samples=2, tokenizer="lumina-tiny") as w:
        for k, (name, caption) in enumerate(sorted(PHOTO_CAPTIONS.items())):
            crop = crops[name]
            pixels = torch.from_numpy(crop).permute(2, 0, 1)[None].float() / 127.5 - 1.0
            with torch.inference_mode():
                codes = model.encode(pixels)[0].numpy()
            rows, cols = codes.shape
            grid = [
                [vocab[tiny.image_code_token(int(c))] for c in row] + [vocab["<reserved08799>"]]
                for row in codes
            ]
            block = (
                [
                    vocab["<racm3:break>"],
                    vocab[f"<reserved{8800 + rows // 2:05d}>"],
                    vocab[f"<reserved{8800 + cols // 2:05d}>"],
                ]
                + [t for row in grid for t in row]
                + [vocab["<eoss>"]]
            )
            prompt = [vocab["<s>"]] + tok.encode("Describe the photo.", add_special_tokens=False).ids
            answer = tok.encode(caption, add_special_tokens=False).ids + [vocab["</s>"]]
            ids = np.array(prompt + block + answer, np.int64)
            labels = np.where(np.arange(len(ids)) >= len(prompt) + len(block), ids, -100)
            h, w_px = crop.shape[:2]
            meta = {
                "source": "captions.json",
                "index": k,
                "id": f"cap-{name}",
                "images": [
                    {
                        "offset": len(prompt),
                        "num_tokens": len(block),
                        "h": h,
                        "w": w_px,
                        "grid": [rows, cols],
                        "crop": [0, 0, w_px, h],
                        "orig_size": [w_px, h],
                    }
                ],
            }
            w.write(f"photo-{name}", ids, labels=labels, meta=meta)
    merge(out)
    return os.path.join(out, "index.json"), root

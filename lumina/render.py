"""Image tokens back to pictures: the Chameleon renderer and ``lumina render``.

A sample's image blocks (``meta.images`` entries ``{offset, num_tokens, w, h, grid, ...}``,
``docs/format.md``) hold ``<racm3:break>``, two grid-size tokens, ``grid[0]`` rows of
``grid[1]`` image codes each followed by ``<reserved08799>``, and ``<eoss>``
(``LUMINA_TOKENS.md``). The renderer keeps the ids that are image codes (``IMGIMG<letters>Z``
in the vocabulary, letters A-J spelling the code's digits), reshapes them to the grid and runs
the VQGAN decoder of :mod:`lumina.vqgan`.

Python (the contract the model-agnostic viewer uses)::

    renderer = load_renderer("ckpts/chameleon/tokenizer")   # or a make-tiny output folder
    png = renderer.render(input_ids, meta["images"][0])      # PNG bytes

Command line::

    lumina render SOURCE --key KEY --out DIR [--vq PATH]     # writes DIR/KEY-img0.png, ...
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import threading
from typing import Any

import numpy as np

__all__ = ["ChameleonRenderer", "add_arguments", "code_index", "load_renderer", "read_vocabulary", "run"]

DEFAULT_VQ = "ckpts/chameleon/tokenizer"  # where Lumina-mGPT keeps Meta's tokenizer files
VOCAB_FILES = ("text_tokenizer.json", "tokenizer.json")  # Meta's name, Hugging Face's name
WEIGHT_FILES = ("vqgan.safetensors", "vqgan.ckpt")  # safetensors first: no pickle at all
SUBFOLDERS = ("vq", "tokenizer")  # make-tiny output root; a Chameleon folder holding tokenizer/


def code_index(name: str) -> int | None:
    """The VQ code of an ``IMGIMG<letters>Z`` token name (A-J spell digits), else None."""
    if not (name.startswith("IMGIMG") and name.endswith("Z") and len(name) > 7):
        return None
    letters = name[6:-1]
    if not all("A" <= c <= "J" for c in letters):
        return None
    return int("".join(str(ord(c) - ord("A")) for c in letters))


def read_vocabulary(folder: str) -> dict[str, int] | None:
    """Token name -> id from ``text_tokenizer.json`` or ``tokenizer.json`` (``model.vocab`` plus
    ``added_tokens``), or from ``config.json``'s ``vocabulary_map``; None if the folder has none."""
    for name in VOCAB_FILES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
            vocab = dict(doc.get("model", {}).get("vocab") or {})
            vocab.update({t["content"]: t["id"] for t in doc.get("added_tokens", [])})
            if any(code_index(k) is not None for k in vocab):
                return vocab
    path = os.path.join(folder, "config.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            vocab = json.load(f).get("vocabulary_map")
        if vocab:
            return dict(vocab)
    return None


class ChameleonRenderer:
    """Decodes the image blocks of a token sequence to pictures with a Chameleon VQGAN.

    ``vocabulary`` maps token names to ids; only its ``IMGIMG...`` entries are used. Rendering
    is serialised by a lock (one decoder, callable from a threaded web server).
    """

    def __init__(self, model: Any, vocabulary: dict[str, int], device: Any = "cpu") -> None:
        codes: dict[int, int] = {}
        for name, token_id in vocabulary.items():
            code = code_index(name)
            if code is not None:
                codes[int(token_id)] = code
        if not codes:
            raise ValueError("the vocabulary has no IMGIMG image-code tokens (not a Chameleon vocabulary)")
        num_codes = model.config.n_embed
        too_big = [c for c in codes.values() if c >= num_codes]
        if too_big:
            raise ValueError(
                f"the vocabulary names code {max(too_big)}, the VQGAN codebook has "
                f"{num_codes}: vocabulary and VQGAN belong to different models"
            )
        self.code_of_id = np.full(max(codes) + 1, -1, dtype=np.int64)
        self.code_of_id[list(codes)] = list(codes.values())
        self.model = model.to(device).eval()
        self._lock = threading.Lock()

    def codes(self, input_ids: np.ndarray, block: dict) -> np.ndarray:
        """The ``(rows, cols)`` code grid of one image block (structure tokens skipped)."""
        try:
            offset, n = int(block["offset"]), int(block["num_tokens"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"image block {block!r:.80}: needs integer offset and num_tokens") from None
        ids = np.asarray(input_ids[offset : offset + n]).astype(np.int64)
        where = f"image block at token {offset}"
        if offset < 0 or len(ids) != n:
            raise ValueError(f"{where}: {n} tokens, the sample has {len(input_ids)} tokens in all")
        rows, cols = self._grid(block, where)
        inside = ids[(ids >= 0) & (ids < len(self.code_of_id))]
        codes = self.code_of_id[inside]
        codes = codes[codes >= 0]
        if codes.size != rows * cols:
            raise ValueError(f"{where}: {codes.size} image codes, its {rows}x{cols} grid needs {rows * cols}")
        return codes.reshape(rows, cols)

    @staticmethod
    def _grid(block: dict, where: str) -> tuple[int, int]:
        if block.get("grid"):
            rows, cols = (int(v) for v in block["grid"])
        elif "h" in block and "w" in block:
            rows, cols = int(block["h"]) // 16, int(block["w"]) // 16
        else:
            raise ValueError(f"{where}: the block has neither grid nor h/w")
        if rows < 1 or cols < 1:
            raise ValueError(f"{where}: empty grid {rows}x{cols}")
        return rows, cols

    def render_image(self, input_ids: np.ndarray, block: dict) -> Any:
        """One block as a ``PIL.Image`` (RGB), resized bilinearly to ``(w, h)`` when those differ
        from ``16 * grid`` (they do not for blocks this project writes)."""
        from PIL import Image

        from lumina.vqgan import codes_to_pixels

        codes = self.codes(input_ids, block)
        with self._lock:
            pixels = codes_to_pixels(self.model, codes)
        image = Image.fromarray(pixels, "RGB")
        size = (int(block.get("w") or image.width), int(block.get("h") or image.height))
        return image if size == image.size else image.resize(size, Image.Resampling.BILINEAR)

    def render(self, input_ids: np.ndarray, block: dict) -> bytes:
        """One block (an entry of ``meta["images"]``) as PNG bytes."""
        buf = io.BytesIO()
        self.render_image(input_ids, block).save(buf, format="PNG")
        return buf.getvalue()


def _vq_folder(path: str) -> str:
    if os.path.isfile(os.path.join(path, "vqgan.yaml")):
        return path
    for sub in SUBFOLDERS:
        if os.path.isfile(os.path.join(path, sub, "vqgan.yaml")):
            return os.path.join(path, sub)
    raise FileNotFoundError(f"{path}: no vqgan.yaml in it (nor in {' or '.join(SUBFOLDERS)}/ below it)")


def load_renderer(path: str, vocab: str | None = None, device: str | None = None) -> ChameleonRenderer:
    """A :class:`ChameleonRenderer` from Meta's tokenizer files in folder ``path``.

    Looks for, in ``path`` (or else in ``path/vq/`` or ``path/tokenizer/``, the first that has
    a ``vqgan.yaml``): ``vqgan.yaml``, then the weights ``vqgan.safetensors`` or else
    ``vqgan.ckpt`` (read with ``weights_only``; refused if it needs unpickling of code), then
    the vocabulary: ``text_tokenizer.json`` (Meta's), ``tokenizer.json`` (Hugging Face's) or
    ``config.json`` with a ``vocabulary_map`` (a transformers Chameleon model folder), in that
    folder or in ``vocab`` when given. That is Lumina-mGPT's ``ckpts/chameleon/tokenizer/`` as
    is, and ``lumina make-tiny``'s output folder. ``device``: default CUDA when available.
    Raises ``FileNotFoundError``/``ValueError`` with one line naming what is missing or wrong.
    """
    import torch

    from lumina.vqgan import load_vqgan

    folder = _vq_folder(path)
    weights = next(
        (os.path.join(folder, w) for w in WEIGHT_FILES if os.path.isfile(os.path.join(folder, w))), None
    )
    if weights is None:
        raise FileNotFoundError(f"{folder}: has vqgan.yaml but no {' or '.join(WEIGHT_FILES)}")
    vocab_folder = vocab or folder
    vocabulary = read_vocabulary(vocab_folder)
    if vocabulary is None:
        raise FileNotFoundError(
            f"{vocab_folder}: no vocabulary ({', '.join(VOCAB_FILES)} or config.json "
            "with vocabulary_map holding IMGIMG tokens)"
        )
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_vqgan(os.path.join(folder, "vqgan.yaml"), weights, with_encoder=False, device=device)
    return ChameleonRenderer(model, vocabulary, device=device)


# ----------------------------------------------------------------------------------------------
# lumina render


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "source",
        metavar="SOURCE",
        help="a dataset manifest (index.json), a shard index or a shard (.tar); local, https:// or s3://",
    )
    p.add_argument("--key", required=True, help="the sample's key")
    p.add_argument("--out", required=True, help="output folder; gets KEY-img0.png, KEY-img1.png, ...")
    p.add_argument(
        "--vq",
        default=DEFAULT_VQ,
        help="folder with vqgan.yaml + vqgan.ckpt/.safetensors and the vocabulary "
        f"(default: {DEFAULT_VQ}, Lumina-mGPT's; a make-tiny output folder works too)",
    )
    p.add_argument(
        "--vocab",
        default=None,
        help="folder holding the vocabulary when --vq has none (tokenizer or Chameleon model folder)",
    )
    p.add_argument("--device", default=None, help="decoder device (default: cuda if available, else cpu)")


def find_sample(source: str, key: str) -> dict:
    """The sample ``key`` of ``source``, read by one byte-range request; KeyError if absent."""
    from wds_tools.reader import open_shards

    for shard in open_shards(source):
        if key in shard.keys:
            return shard.read(shard.keys.index(key))
    raise KeyError(key)


def run(args: argparse.Namespace) -> int:
    """Write every image block of sample ``--key`` as a PNG file and print the paths."""
    from wds_tools.io import redact, scrub

    try:
        renderer = load_renderer(args.vq, vocab=args.vocab, device=args.device)
    except (OSError, ValueError) as e:
        print(f"error: --vq: {e}", file=sys.stderr)
        return 2
    try:
        sample = find_sample(args.source, args.key)
    except KeyError:
        print(f"error: no sample with key {args.key!r} in {redact(args.source)}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:  # wds_tools' FormatError is a ValueError
        print(f"error: {redact(args.source)}: {scrub(str(e))}", file=sys.stderr)
        return 2
    blocks = (sample.get("meta") or {}).get("images") or []
    if not blocks:
        print(f"error: sample {args.key!r} has no image blocks (meta.images is empty)", file=sys.stderr)
        return 1
    os.makedirs(args.out, exist_ok=True)
    for n, block in enumerate(blocks):
        path = os.path.join(args.out, f"{args.key}-img{n}.png")
        try:
            png = renderer.render(sample["input_ids"], block)
        except ValueError as e:
            print(f"error: sample {args.key!r}: {e}", file=sys.stderr)
            return 1
        with open(path, "wb") as f:
            f.write(png)
        print(path)
    return 0

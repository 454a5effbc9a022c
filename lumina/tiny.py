"""Tiny offline stand-ins for the Chameleon text tokenizer and checkpoint.

Tests and the demo must run the *real* loading path (``AutoTokenizer.from_pretrained(path)``,
``ChameleonForConditionalGeneration.from_pretrained(path)``) with no hub access. This module builds:

- a byte-level BPE tokenizer trained locally on a small built-in corpus (any unicode text encodes,
  byte fallback through the byte alphabet), plus the special tokens the Lumina-mGPT layout needs,
  named as in the real Chameleon vocabulary (ids differ: always look tokens up by name);
- a tiny random ``ChameleonForConditionalGeneration`` whose ``vocabulary_map`` is the tokenizer's
  vocabulary, and whose VQ encoder keeps Chameleon's 16x spatial downsampling (5 resolution
  levels), so the image block layout ``h/16 x w/16`` holds.

Command line: ``python -m lumina.tiny --out DIR`` writes ``DIR/tokenizer`` and ``DIR/model``.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

__all__ = [
    "IMAGE_PLACEHOLDER",
    "SPECIAL_TOKENS",
    "build_tiny_chameleon",
    "build_tiny_tokenizer",
    "image_code_token",
    "main",
    "real_vq_config",
]

IMAGE_PLACEHOLDER = "<|image|>"

# Named as in the real Chameleon vocabulary (ids there in comments, for orientation only).
SPECIAL_TOKENS = {
    "bos": "<s>",  # 0
    "pad": "<pad>",  # 1
    "eos": "</s>",  # 2
    "unk": "<unk>",  # 3
    "image_end": "<eoss>",  # 8196
    "image_start": "<racm3:break>",  # 8197
    "end_of_turn": "<reserved08706>",  # 8710
    "image": "<image>",  # 8711 in the transformers conversion
    "row_end": "<reserved08799>",  # 8803
}
NUM_GRID_TOKENS = 65  # <reserved08800> .. <reserved08864>: grid sizes 0..64 (2048 px at 32 px)

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A picture is worth a thousand words.
Generate an image of 768x768 according to the following prompt:
A photograph of an astronaut standing in front of a flag on the surface of the moon.
Describe the image in detail. What is shown in this picture? How many people are there?
A cat with orange and black fur lies on a blanket and looks at the camera.
A cup of coffee on a saucer, seen from above, with foam on top and a spoon beside it.
A rocket on the launch pad before lift-off, with clouds of vapour around its base.
Deep space: thousands of galaxies of different shapes, colours and sizes on a black sky.
The answer is yes. The answer is no. There are two of them on the left and one on the right.
Images, text, tokens, labels and supervision: the model learns to predict the assistant turn.
Question: what colour is the sky? Answer: blue, with a few white clouds near the horizon.
Numbers 0 1 2 3 4 5 6 7 8 9 10 16 32 64 128 256 512 768 1024 2048 and punctuation , . ; : ! ?
Unicode: café naïve résumé Straße Ελληνικά русский 中文 日本語 한국어 emoji 🙂 🚀 ✨ — “quotes”.
"""


def image_code_token(index: int) -> str:
    """Chameleon's vocabulary name of VQ code ``index``: digits spelled A-J, ``IMGIMG...Z``.

    transformers' ``ChameleonImageVocabularyMapping.bpe2img`` inverts exactly this naming.
    """
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(index)) + "Z"


def _special_token_list(num_image_tokens: int) -> list[str]:
    s = SPECIAL_TOKENS
    tokens = [s["bos"], s["pad"], s["eos"], s["unk"]]
    tokens += [image_code_token(i) for i in range(num_image_tokens)]
    tokens += [s["image_end"], s["image_start"], s["end_of_turn"], s["image"], s["row_end"]]
    tokens += [f"<reserved{8800 + k:05d}>" for k in range(NUM_GRID_TOKENS)]
    tokens += [IMAGE_PLACEHOLDER]
    return tokens


def build_tiny_tokenizer(out_dir: str, num_image_tokens: int = 512, bpe_vocab_size: int = 1024) -> str:
    """Train a tiny byte-level BPE tokenizer and save it as a Hugging Face tokenizer folder.

    Special tokens come first (ids 0..), in the real Chameleon order: ``<s> <pad> </s> <unk>``, the
    ``num_image_tokens`` image-code tokens, then the image/turn structure tokens, the grid-size
    tokens ``<reserved08800..08864>`` and the ``<|image|>`` placeholder. Returns ``out_dir``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = _special_token_list(num_image_tokens)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=len(specials) + bpe_vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines() * 4, trainer=trainer)
    bos = SPECIAL_TOKENS["bos"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=SPECIAL_TOKENS["eos"],
        pad_token=SPECIAL_TOKENS["pad"],
        unk_token=SPECIAL_TOKENS["unk"],
    )
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    return out_dir


def tiny_vq_config(num_embeddings: int) -> dict[str, Any]:
    """A VQ encoder small enough for CPU tests that keeps 16x downsampling (5 levels)."""
    return dict(
        embed_dim=8,
        num_embeddings=num_embeddings,
        latent_channels=32,
        resolution=256,
        base_channels=32,  # GroupNorm(32 groups) needs a multiple of 32
        channel_multiplier=[1, 1, 1, 1, 1],  # 5 levels -> 4 stride-2 downsamplings = 16x
        num_res_blocks=0,
        attn_resolutions=None,
    )


def real_vq_config(num_embeddings: int = 8192) -> dict[str, Any]:
    """Chameleon's real VQ architecture (transformers' defaults), for benchmarks with random weights."""
    from transformers import ChameleonVQVAEConfig

    cfg = ChameleonVQVAEConfig(num_embeddings=num_embeddings).to_dict()
    return {k: cfg[k] for k in tiny_vq_config(num_embeddings)} | {"attn_type": cfg["attn_type"]}


def build_tiny_chameleon(out_dir: str, tokenizer_dir: str, **size_overrides: Any) -> str:
    """Build a tiny random Chameleon checkpoint consistent with the tokenizer in ``tokenizer_dir``.

    ``size_overrides`` override ``ChameleonConfig`` fields (``hidden_size``, ``num_hidden_layers``,
    ...); ``vq_config`` given as a dict is merged over the tiny VQ config, or pass
    ``vq_config="real"`` for Chameleon's real-size VQ architecture. The VQ codebook size is the
    number of ``IMGIMG`` tokens in the tokenizer. Returns ``out_dir``.
    """
    import torch
    from transformers import AutoTokenizer, ChameleonConfig, ChameleonForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab = tokenizer.get_vocab()
    num_codes = sum(1 for name in vocab if name.startswith("IMGIMG"))
    if num_codes == 0:
        raise ValueError(f"tokenizer at {tokenizer_dir} has no IMGIMG image-code tokens")
    vq_override = size_overrides.pop("vq_config", None)
    vq = real_vq_config(num_codes) if vq_override == "real" else tiny_vq_config(num_codes)
    if isinstance(vq_override, dict):
        vq.update(vq_override)
    fields = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    fields.update(size_overrides)
    config = ChameleonConfig(vq_config=vq, vocabulary_map=dict(vocab), **fields)
    torch.manual_seed(0)
    model = ChameleonForConditionalGeneration(config)
    model.save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    """``python -m lumina.tiny --out DIR``: write ``DIR/tokenizer`` and ``DIR/model``."""
    parser = argparse.ArgumentParser(prog="lumina make-tiny", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder; gets tokenizer/ and model/")
    parser.add_argument("--num_image_tokens", type=int, default=512, help="VQ codebook size (<= 8192)")
    parser.add_argument(
        "--vq_config", choices=["tiny", "real"], default="tiny",
        help="tiny VQ encoder, or Chameleon's real-size VQ architecture with random weights",
    )


def run(args: argparse.Namespace) -> int:
    tok_dir = build_tiny_tokenizer(os.path.join(args.out, "tokenizer"), args.num_image_tokens)
    overrides = {"vq_config": "real"} if args.vq_config == "real" else {}
    model_dir = build_tiny_chameleon(os.path.join(args.out, "model"), tok_dir, **overrides)
    print(f"tokenizer: {tok_dir}\nmodel:     {model_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

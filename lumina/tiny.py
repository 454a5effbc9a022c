"""Tiny offline stand-ins for the Chameleon text tokenizer and checkpoint.

Tests and the demo must run the *real* loading path (``AutoTokenizer.from_pretrained(path)``,
``ChameleonForConditionalGeneration.from_pretrained(path)``) with no hub access. This module builds:

- a byte-level BPE tokenizer trained locally on a small built-in corpus (any unicode text encodes,
  byte fallback through the byte alphabet), plus the special tokens the Lumina-mGPT layout needs,
  named as in the real Chameleon vocabulary (ids differ: always look tokens up by name);
- a tiny random ``ChameleonForConditionalGeneration`` whose ``vocabulary_map`` is the tokenizer's
  vocabulary, and whose VQ encoder keeps Chameleon's 16x spatial downsampling (5 resolution
  levels), so the image block layout ``h/16 x w/16`` holds;
- a matching tiny VQGAN *decoder* in Meta's checkpoint layout (``vq/vqgan.yaml``,
  ``vq/vqgan.ckpt``, ``vq/text_tokenizer.json``: what ``lumina.render.load_renderer`` reads), so
  pre-tokenized demo data render back to pictures.

The tiny VQ is fitted to the bundled photos (:func:`fit_photo_vqgan`): the encoder computes each
16 x 16 patch's mean colour, the codebook is a k-means palette of those colours over the photos,
and the decoder paints each code's colour over its patch: a mosaic of the photo in its own
colours, 19.7 dB PSNR on the bundled photos (docs/inspect.md). Its weights are set, not learned
by gradient descent: Meta's architecture puts a GroupNorm over each picture right before the
encoder's and the decoder's output, and at a CPU-test width of 32 channels (one per group) a
briefly trained pair loses each picture's colours (measured: sepia pictures at 14.5 dB after
200 Adam steps, about a minute of CPU). At 64 channels, pairs ``(a, -a)`` scaled far below
GroupNorm's epsilon make each normalisation a fixed gain, so the hand-set pipeline is exact.

Command line: ``python -m lumina.tiny --out DIR`` writes ``DIR/tokenizer``, ``DIR/model``, ``DIR/vq``.
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
    "demo_photo_crops",
    "fit_photo_vqgan",
    "image_code_token",
    "main",
    "real_vq_config",
    "write_tiny_vq",
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
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
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
    return {
        "embed_dim": 8,
        "num_embeddings": num_embeddings,
        "latent_channels": 32,
        "resolution": 256,
        "base_channels": 64,  # GroupNorm(32 groups): two channels per group carry a colour exactly
        "channel_multiplier": [1, 1, 1, 1, 1],  # 5 levels -> 4 stride-2 downsamplings = 16x
        "num_res_blocks": 0,
        "attn_resolutions": None,
    }


def real_vq_config(num_embeddings: int = 8192) -> dict[str, Any]:
    """Chameleon's real VQ architecture (transformers' defaults), for benchmarks with random weights."""
    from transformers import ChameleonVQVAEConfig

    cfg = ChameleonVQVAEConfig(num_embeddings=num_embeddings).to_dict()
    return {k: cfg[k] for k in tiny_vq_config(num_embeddings)} | {"attn_type": cfg["attn_type"]}


def build_tiny_chameleon(
    out_dir: str, tokenizer_dir: str, vq_state: dict | None = None, **size_overrides: Any
) -> str:
    """Build a tiny random Chameleon checkpoint consistent with the tokenizer in ``tokenizer_dir``.

    ``size_overrides`` override ``ChameleonConfig`` fields (``hidden_size``, ``num_hidden_layers``,
    ...); ``vq_config`` given as a dict is merged over the tiny VQ config, or pass
    ``vq_config="real"`` for Chameleon's real-size VQ architecture. The VQ codebook size is the
    number of ``IMGIMG`` tokens in the tokenizer. ``vq_state``: weights for the ``vqmodel``
    (``encoder.*``, ``quant_conv.*``, ``quantize.*``; a :class:`lumina.vqgan.VQGAN` state dict
    fits, its decoder keys are ignored), else random. Returns ``out_dir``.
    """
    import torch
    from transformers import (
        AutoTokenizer,
        ChameleonConfig,
        ChameleonForConditionalGeneration,
    )

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab = tokenizer.get_vocab()
    num_codes = sum(1 for name in vocab if name.startswith("IMGIMG"))
    if num_codes == 0:
        raise ValueError(f"tokenizer at {tokenizer_dir} has no IMGIMG image-code tokens")
    vq_override = size_overrides.pop("vq_config", None)
    vq = real_vq_config(num_codes) if vq_override == "real" else tiny_vq_config(num_codes)
    if isinstance(vq_override, dict):
        vq.update(vq_override)
    fields = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 4096,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    fields.update(size_overrides)
    config = ChameleonConfig(vq_config=vq, vocabulary_map=dict(vocab), **fields)
    torch.manual_seed(0)
    model = ChameleonForConditionalGeneration(config)
    if vq_state is not None:
        _load_vq_state(model.model.vqmodel, vq_state)
    model.save_pretrained(out_dir)
    return out_dir


def _load_vq_state(vqmodel: Any, vq_state: dict) -> None:
    """Copy Meta-layout VQGAN weights into transformers' ``vqmodel`` (same key names)."""
    wanted = vqmodel.state_dict()
    missing = [k for k in wanted if k not in vq_state]
    wrong = [k for k in wanted if k in vq_state and vq_state[k].shape != wanted[k].shape]
    if missing or wrong:
        raise ValueError(
            f"VQ weights do not fit the tiny vqmodel: missing {missing[:3]}, mis-shaped {wrong[:3]}"
        )
    vqmodel.load_state_dict({k: vq_state[k] for k in wanted})


# ----------------------------------------------------------------------------------------------
# The tiny VQGAN fitted to the bundled photos

DEMO_PHOTOS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "demo")
_SMALL = 1e-5  # pair activations: variance ~1e-10, far below GroupNorm's eps (1e-6)
_GAIN = 1.0 / (_SMALL / 1e-3)  # norm_out weight: undoes (SMALL / sqrt(eps)), back to [-1, 1]
_LIFT = 20.0  # norm_out bias: silu(20 + x) = 20 + x within 1e-7 for |x| <= 1


def demo_photo_crops(target_size: int = 256) -> list:
    """The bundled photos, centre-cropped as the demo pre-tokenizes them (uint8 RGB arrays)."""
    from lumina.image_processing import crop_size_list, prepare_image

    names = sorted(n for n in os.listdir(DEMO_PHOTOS) if n.endswith(".jpg"))
    return [
        prepare_image(os.path.join(DEMO_PHOTOS, n), crop_size_list(target_size), None).pixels for n in names
    ]


def _kmeans(points: Any, k: int, seed: int, iters: int = 40) -> Any:
    """Lloyd's k-means in float64 with a seeded start; empty clusters keep their centre."""
    import numpy as np

    rng = np.random.RandomState(seed)
    centres = points[rng.choice(len(points), size=min(k, len(points)), replace=False)].copy()
    for _ in range(iters):
        assign = ((points[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)
        for j in range(len(centres)):
            members = points[assign == j]
            if len(members):
                centres[j] = members.mean(0)
    if len(centres) < k:  # fewer patches than codes: pad with a grey ramp
        ramp = np.linspace(-1, 1, k - len(centres))[:, None].repeat(points.shape[1], 1)
        centres = np.concatenate([centres, ramp])
    return centres


def fit_photo_vqgan(vq_config: dict, photos: list | None = None, seed: int = 0) -> Any:
    """A :class:`lumina.vqgan.VQGAN` for ``vq_config`` (transformers' ``ChameleonVQVAEConfig``
    fields) whose codes are the mean colours of 16 x 16 patches, fitted to ``photos`` (default:
    the bundled ones, :func:`demo_photo_crops`).

    Encoder: ``conv_in`` copies R, G, B into channel pairs ``(s*x, -s*x)``; each downsampling
    conv averages 2 x 2; every residual and attention branch is zero (the identity); ``norm_out``
    divides by ``sqrt(eps)`` (the pairs' variance is negligible next to it, their mean is zero)
    and its weight and bias undo that and lift into the linear range of SiLU; ``conv_out`` takes
    the pair difference. Codebook: k-means (seeded) of the photos' patch colours. Decoder: the
    mirror image; each upsampling conv passes its centre tap (nearest-neighbour doubling: a
    mosaic, which scored higher than bilinear smoothing on the photos, 19.7 vs 19.1 dB).
    """
    import numpy as np
    import torch

    from lumina.vqgan import VQGAN, VQGANConfig

    cfg = VQGANConfig.from_transformers(vq_config)
    if cfg.ch // 32 < 2 or cfg.z_channels < 3 or cfg.embed_dim < 3:
        raise ValueError(
            "fit_photo_vqgan needs base_channels >= 64 (channel pairs per GroupNorm "
            "group) and latent_channels, embed_dim >= 3"
        )
    torch.manual_seed(seed)
    model = VQGAN(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        _set_pairs_encoder(model, cfg)
        _set_pairs_decoder(model, cfg)
        photos = demo_photo_crops() if photos is None else photos
        pixels = [torch.from_numpy(p / 255.0 * 2 - 1).permute(2, 0, 1)[None].float() for p in photos]
        colours = np.concatenate(
            [model.latents(x)[0, :3].permute(1, 2, 0).reshape(-1, 3).double().numpy() for x in pixels]
        )
        palette = _kmeans(colours, cfg.n_embed, seed)
        model.quantize.embedding.weight[:, :3] = torch.from_numpy(palette).float()
    return model


def _pair_in(conv: Any, sources: int = 3, scale: float = _SMALL) -> None:
    """``conv`` (3 x 3) writes source channel k into channels (2k, 2k+1) as (scale*x, -scale*x)."""
    for k in range(sources):
        conv.weight[2 * k, k, 1, 1], conv.weight[2 * k + 1, k, 1, 1] = scale, -scale


def _pair_out(norm: Any, conv: Any, sources: int = 3) -> None:
    """``norm``'s gain and lift, then ``conv`` (3 x 3) takes each pair's half-difference."""
    norm.weight[: 2 * sources], norm.bias[: 2 * sources] = _GAIN, _LIFT
    for k in range(sources):
        conv.weight[k, 2 * k, 1, 1], conv.weight[k, 2 * k + 1, 1, 1] = 0.5, -0.5


def _identity_blocks(part: Any, channels: int) -> None:
    """Residual blocks pass their input on: zero branches, shortcuts copy the pair channels."""
    from lumina.vqgan import ResnetBlock

    for block in part.modules():
        if isinstance(block, ResnetBlock) and block.nin_shortcut is not None:
            for j in range(channels):
                block.nin_shortcut.weight[j, j, 0, 0] = 1.0


def _set_pairs_encoder(model: Any, cfg: Any) -> None:
    enc = model.encoder
    _pair_in(enc.conv_in)
    for level in enc.down:
        if level.downsample is not None:  # taps (0..1, 0..1) of the 3 x 3 window: a 2 x 2 mean
            for j in range(6):
                level.downsample.conv.weight[j, j, 0:2, 0:2] = 0.25
    _identity_blocks(enc, 6)
    _pair_out(enc.norm_out, enc.conv_out)
    for k in range(3):
        model.quant_conv.weight[k, k, 0, 0] = 1.0


def _set_pairs_decoder(model: Any, cfg: Any) -> None:
    dec = model.decoder
    for k in range(3):
        model.post_quant_conv.weight[k, k, 0, 0] = 1.0
    _pair_in(dec.conv_in)
    for level in dec.up:
        if level.upsample is not None:
            for j in range(6):
                level.upsample.conv.weight[j, j, 1, 1] = 1.0
    _identity_blocks(dec, 6)
    _pair_out(dec.norm_out, dec.conv_out)


def write_tiny_vq(out_dir: str, model: Any, tokenizer_dir: str) -> str:
    """Meta's tokenizer-folder layout: ``vqgan.yaml``, ``vqgan.ckpt`` and the vocabulary as
    ``text_tokenizer.json`` (a copy of the tokenizer's ``tokenizer.json``). Returns ``out_dir``."""
    import shutil

    from lumina.vqgan import save_vqgan

    save_vqgan(model, out_dir)
    shutil.copyfile(
        os.path.join(tokenizer_dir, "tokenizer.json"), os.path.join(out_dir, "text_tokenizer.json")
    )
    return out_dir


def main(argv: list[str] | None = None) -> int:
    """``python -m lumina.tiny --out DIR``: write ``DIR/tokenizer``, ``DIR/model`` and ``DIR/vq``."""
    parser = argparse.ArgumentParser(prog="lumina make-tiny", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder; gets tokenizer/, model/ and vq/")
    parser.add_argument("--num_image_tokens", type=int, default=512, help="VQ codebook size (<= 8192)")
    parser.add_argument(
        "--vq_config",
        choices=["tiny", "real"],
        default="tiny",
        help="tiny VQ encoder, or Chameleon's real-size VQ architecture with random weights (and no vq/)",
    )
    parser.add_argument(
        "--random_vq",
        action="store_true",
        help="random tiny VQ weights instead of the VQ fitted to the bundled photos (no vq/ written)",
    )


def run(args: argparse.Namespace) -> int:
    tok_dir = build_tiny_tokenizer(os.path.join(args.out, "tokenizer"), args.num_image_tokens)
    overrides: dict[str, Any] = {"vq_config": "real"} if args.vq_config == "real" else {}
    vqgan = None
    if args.vq_config == "tiny" and not args.random_vq:
        vqgan = fit_photo_vqgan(tiny_vq_config(args.num_image_tokens))
        overrides["vq_state"] = vqgan.state_dict()
    model_dir = build_tiny_chameleon(os.path.join(args.out, "model"), tok_dir, **overrides)
    print(f"tokenizer: {tok_dir}\nmodel:     {model_dir}")
    if vqgan is not None:
        vq_dir = write_tiny_vq(os.path.join(args.out, "vq"), vqgan, tok_dir)
        print(f"vq:        {vq_dir}  (decoder for lumina render)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Stage 4: cropped pixels -> image blocks of vocabulary ids, encoded in batches.

The image tokenizer is the ``vqmodel`` of a transformers Chameleon checkpoint (a full
``ChameleonForConditionalGeneration`` folder or hub id, or a ``ChameleonVQVAE`` one). Only the VQ
weights are loaded (``from_pretrained`` with a key mapping), not the language model.

Block layout (``LUMINA_TOKENS.md``)::

    <racm3:break> <reserved{8800+h/32}> <reserved{8800+w/32}>
    h/16 rows of (w/16 codes, <reserved08799>)
    <eoss>

Codes map to vocabulary ids by their Chameleon names (``IMGIMG`` + digits spelled A-J + ``Z``),
looked up in the text tokenizer's vocabulary; a checkpoint's own ``vocabulary_map`` must agree.

Pixels are scaled as Lumina-mGPT's own image tokenizer does, ``x / 255 * 2 - 1`` (exactly
[-1, 1]); transformers' ``ChameleonImageProcessor`` scaling (``x * 0.0078 - 1``) is an option
(:func:`pixel_values`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from lumina.text_tokens import lookup_token_id
from lumina.tiny import image_code_token

__all__ = [
    "PIXEL_SCALINGS",
    "REFERENCE_RESCALE_FACTOR",
    "TRANSFORMERS_RESCALE_FACTOR",
    "ImageVocab",
    "VQEncoder",
    "image_block",
    "load_vq_model",
    "pixel_lut",
    "pixel_values",
]

DOWNSAMPLE = 16
GRID = 32
_VQ_KEY_MAPPING = {r"^model\.vqmodel\.": ""}  # full checkpoints; also what ChameleonVQVAE saves


@dataclass(frozen=True)
class ImageVocab:
    """Ids of the image-block structure tokens and of the image codes, looked up by name."""

    image_start: int
    image_end: int
    row_end: int
    code_ids: np.ndarray  # code index -> vocabulary id
    tokenizer: Any = None
    _grid_ids: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> "ImageVocab":
        vocab = tokenizer.get_vocab()
        code_ids: list[int] = []
        while image_code_token(len(code_ids)) in vocab:
            code_ids.append(vocab[image_code_token(len(code_ids))])
        if not code_ids:
            raise ValueError(
                "the text tokenizer has no IMGIMG image-code tokens (not a Chameleon vocabulary)"
            )
        return cls(
            image_start=lookup_token_id(tokenizer, "<racm3:break>"),
            image_end=lookup_token_id(tokenizer, "<eoss>"),
            row_end=lookup_token_id(tokenizer, "<reserved08799>"),
            code_ids=np.array(code_ids, dtype=np.int64),
            tokenizer=tokenizer,
        )

    def grid_id(self, n_grids: int) -> int:
        """Id of ``<reserved{8800 + n_grids:05d}>`` (cached)."""
        if n_grids not in self._grid_ids:
            self._grid_ids[n_grids] = lookup_token_id(self.tokenizer, f"<reserved{8800 + n_grids:05d}>")
        return self._grid_ids[n_grids]

    def check_vocabulary_map(self, vocabulary_map: Optional[dict]) -> None:
        """Refuse a checkpoint whose own image-token ids disagree with the tokenizer's."""
        if not vocabulary_map:
            return
        for code in range(len(self.code_ids)):
            mapped = vocabulary_map.get(image_code_token(code))
            if mapped is not None and mapped != self.code_ids[code]:
                raise ValueError(
                    f"the VQ checkpoint's vocabulary_map gives {image_code_token(code)} id {mapped}, the tokenizer "
                    f"{self.code_ids[code]}: --tokenizer and --vq_model belong to different vocabularies"
                )


def image_block(code_ids: np.ndarray, vocab: ImageVocab) -> np.ndarray:
    """The token block of one image; ``code_ids`` are vocabulary ids shaped ``(h/16, w/16)``."""
    rows, cols = code_ids.shape
    h, w = rows * DOWNSAMPLE, cols * DOWNSAMPLE
    grid = np.concatenate([code_ids, np.full((rows, 1), vocab.row_end, dtype=np.int64)], axis=1)
    head = [vocab.image_start, vocab.grid_id(h // GRID), vocab.grid_id(w // GRID)]
    return np.concatenate([np.array(head, dtype=np.int64), grid.reshape(-1), [vocab.image_end]]).astype(
        np.int64
    )


def load_vq_model(name_or_path: str, dtype: Any = None) -> tuple[Any, Optional[dict]]:
    """``(ChameleonVQVAE in eval mode, the checkpoint's vocabulary_map or None)``."""
    import transformers
    from transformers import AutoConfig, ChameleonVQVAE

    config = AutoConfig.from_pretrained(name_or_path)
    if config.model_type == "chameleon":
        vq_config, vocabulary_map = config.vq_config, config.vocabulary_map
    elif config.model_type == "chameleon_vqgan":
        vq_config, vocabulary_map = config, None
    else:
        raise ValueError(f"--vq_model {name_or_path!r} is a {config.model_type!r} checkpoint, not Chameleon")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the language-model weights are skipped on purpose
    transformers.logging.disable_progress_bar()
    try:
        loaded: Any = ChameleonVQVAE.from_pretrained(
            name_or_path, config=vq_config, key_mapping=_VQ_KEY_MAPPING, dtype=dtype, output_loading_info=True
        )
        model, info = loaded
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()
    if info["missing_keys"] or info["mismatched_keys"]:
        missing = sorted(info["missing_keys"]) + sorted(map(str, info["mismatched_keys"]))
        raise ValueError(f"--vq_model {name_or_path!r}: VQ weights missing or mismatched: {missing[:5]} ...")
    return model.eval(), vocabulary_map


PIXEL_SCALINGS = ("lumina", "transformers")
TRANSFORMERS_RESCALE_FACTOR = 0.0078  # ChameleonImageProcessor's default rescale_factor
REFERENCE_RESCALE_FACTOR = TRANSFORMERS_RESCALE_FACTOR  # earlier name, kept for imports


def pixel_values(scaling: str = "lumina", rescale_factor: Optional[float] = None) -> np.ndarray:
    """Encoder input of pixel values 0..255, as a 256-entry table.

    ``lumina`` (default): ``x / 255 * 2 - 1`` in float64, exactly [-1, 1]: what Lumina-mGPT's
    own image tokenizer (Meta's ``chameleon_vae_ori``) computes, so what its training data holds.
    ``transformers``: ``ChameleonImageProcessor(do_resize=False, do_center_crop=False)``:
    ``float32(x * rescale_factor) - 1`` (factor 0.0078 by default, so 255 becomes 0.989), float32.
    """
    if scaling not in PIXEL_SCALINGS:
        raise ValueError(f"--pixel_scaling must be one of {', '.join(PIXEL_SCALINGS)}, not {scaling!r}")
    x = np.arange(256, dtype=np.float64)
    if scaling == "lumina":
        if rescale_factor is not None:
            raise ValueError("--rescale_factor applies to --pixel_scaling transformers only")
        return x / 255.0 * 2 - 1
    factor = TRANSFORMERS_RESCALE_FACTOR if rescale_factor is None else rescale_factor
    rescaled = (x * factor).astype(np.float32)
    return (rescaled - np.float32(1.0)) / np.float32(1.0)  # normalize: mean 1, std 1, float32


def pixel_lut(
    dtype: Any, device: Any = "cpu", scaling: str = "lumina", rescale_factor: Optional[float] = None
) -> Any:
    """:func:`pixel_values` as a tensor of the encoder's dtype on its device.

    Cast straight from the table's own precision (float64 for ``lumina``: the reference casts its
    float64 array to the encoder's weights' dtype), so each entry is what the reference feeds.
    """
    import torch

    return torch.from_numpy(pixel_values(scaling, rescale_factor)).to(dtype).to(device)


class VQEncoder:
    """Encodes same-size uint8 RGB crops in batches into image blocks."""

    def __init__(
        self,
        model: Any,
        vocab: ImageVocab,
        device: str = "cpu",
        precision: str = "fp32",
        pixel_scaling: str = "lumina",
        rescale_factor: Optional[float] = None,
    ):
        import torch

        if precision not in ("fp32", "bf16"):
            raise ValueError(f"--precision must be fp32 or bf16, not {precision!r}")
        self.dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        self.device = torch.device(device)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.vocab = vocab
        num_codes = self.model.config.num_embeddings
        if num_codes > len(vocab.code_ids):
            raise ValueError(
                f"the VQ codebook has {num_codes} codes, the tokenizer only {len(vocab.code_ids)} IMGIMG tokens"
            )
        if rescale_factor is not None:  # the older flag: x * factor - 1 is transformers' formula
            pixel_scaling = "transformers"
        self.lut = pixel_lut(self.dtype, self.device, pixel_scaling, rescale_factor)

    @classmethod
    def from_pretrained(cls, name_or_path: str, tokenizer: Any, **kwargs: Any) -> "VQEncoder":
        """Load the VQ weights of ``name_or_path``; ``kwargs`` go to the constructor."""
        model, vocabulary_map = load_vq_model(name_or_path)
        vocab = ImageVocab.from_tokenizer(tokenizer)
        vocab.check_vocabulary_map(vocabulary_map)
        return cls(model, vocab, **kwargs)

    def encode_codes(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        """VQ code indices, ``(B, h/16, w/16)``, for a batch of same-size ``h x w x 3`` uint8 crops."""
        import torch

        batch = torch.from_numpy(np.stack(crops)).to(self.device, non_blocking=True)
        pixels = self.lut[batch.long()].permute(0, 3, 1, 2).contiguous()
        with torch.inference_mode():
            codes = self.model.encode(pixels).image_tokens
        h, w = crops[0].shape[0] // DOWNSAMPLE, crops[0].shape[1] // DOWNSAMPLE
        return codes.view(len(crops), h, w).cpu().numpy()

    def encode_blocks(self, crops: Sequence[np.ndarray]) -> list[np.ndarray]:
        """One image block (vocabulary ids) per crop."""
        codes = self.encode_codes(crops)
        return [image_block(self.vocab.code_ids[c], self.vocab) for c in codes]

"""Stage 3: an image file -> cropped RGB pixels (uint8), exactly as the reference prepares them.

Reference semantics (``LUMINA_TOKENS.md`` and Lumina-mGPT's ``var_center_crop``/``center_crop``,
Chameleon's ``_whiten_transparency``):

- crop sizes on a 32-pixel grid with area near ``T^2`` and aspect at most 4 (:func:`crop_size_list`);
- the size with the closest aspect ratio (ties: the larger ``(w, h)``, as the reference's
  descending sort does);
- on the image *as opened* (its own mode, so PIL resizes palette images with NEAREST and RGBA
  premultiplied): halve with ``BOX`` while both sides are at least twice the crop, ``BICUBIC`` to
  cover the crop, then crop (seeded random offset, or centre);
- then RGB (the processor's ``blend_rgba``): unchanged if already RGB; else if nothing is transparent
  ``convert("RGB")``; else blend onto white in float64 and truncate to uint8.

Pixel scaling is Lumina-mGPT's own (Meta's ``chameleon_vae_ori``): ``x / 255 * 2 - 1`` in float64,
exactly [-1, 1], then a cast to the encoder dtype (transformers' ``ChameleonImageProcessor``
scaling, ``float32(x * 0.0078) - 1`` with white at 0.989, is an option). It is a 256-entry lookup
done on the encoder's device (:func:`lumina.vq_encoder.pixel_lut`), so workers ship uint8 pixels
(4x less inter-process traffic than float32).
This module imports no torch: it runs in the background worker processes.
"""

from __future__ import annotations

import hashlib
import os
import random
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image

from lumina.conversation import BadItem

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "PreparedImage",
    "crop_rng",
    "crop_size_list",
    "load_image",
    "load_image_bytes",
    "pick_crop_size",
    "prepare_image",
    "resize_and_crop",
    "whiten_to_rgb",
]

PATCH_SIZE = 32
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # PIL's own decompression-bomb warning threshold


@dataclass
class PreparedImage:
    """Cropped RGB pixels (``h x w x 3`` uint8) and what the sample metadata records about them."""

    pixels: Optional[np.ndarray]  # None once encoded
    crop: tuple[int, int, int, int]  # left, top, right, bottom in the resized image
    resized_size: tuple[int, int]  # (W, H) of the image the crop was cut from
    orig_size: tuple[int, int]  # (W, H) of the file

    @property
    def size(self) -> tuple[int, int]:
        """(w, h) of the crop: the bucket key of the batched encoder."""
        left, top, right, bottom = self.crop
        return right - left, bottom - top


def crop_size_list(
    target_size: int, patch_size: int = PATCH_SIZE, max_ratio: float = 4.0
) -> list[tuple[int, int]]:
    """Candidate ``(w, h)`` crop sizes for target size ``T``: the reference's enumeration."""
    num_patches = (target_size // patch_size) ** 2
    sizes = []
    wp, hp = num_patches, 1
    while wp > 0:
        if max(wp, hp) / min(wp, hp) <= max_ratio:
            sizes.append((wp * patch_size, hp * patch_size))
        if (hp + 1) * wp <= num_patches:
            hp += 1
        else:
            wp -= 1
    return sizes


def pick_crop_size(size: tuple[int, int], crop_sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """The crop size whose aspect ratio is closest to the image's (``size`` is ``(w, h)``)."""
    w, h = size

    def key(c: tuple[int, int]) -> tuple[float, tuple[int, int]]:
        return min(c[0] / w, c[1] / h) / max(c[0] / w, c[1] / h), c

    return max(crop_sizes, key=key)


def crop_rng(seed: int, index: int, image_number: int) -> random.Random:
    """A per-image RNG: the same crop for the same (seed, item index, image) in any run or rank."""
    digest = hashlib.sha256(f"lumina-crop/{seed}/{index}/{image_number}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def resize_and_crop(
    img: Image.Image,
    crop_size: tuple[int, int],
    rng: Optional[random.Random],
    max_pixels: Optional[int] = None,
) -> tuple[Image.Image, tuple[int, int, int, int], tuple[int, int]]:
    """Halve (BOX), resize to cover (BICUBIC), crop. ``rng=None`` crops at the centre.

    ``max_pixels``: refuse (:class:`BadItem` ``oversize_image``) an image whose resize-to-cover
    would exceed this many pixels: a tiny file of extreme aspect ratio (1 x 20,000) would
    otherwise be upscaled to hundreds of millions of pixels before the crop.
    """
    cw, ch = crop_size
    while img.size[0] >= 2 * cw and img.size[1] >= 2 * ch:
        img = img.resize((img.size[0] // 2, img.size[1] // 2), resample=Image.Resampling.BOX)
    scale = max(cw / img.size[0], ch / img.size[1])
    new_size = (round(img.size[0] * scale), round(img.size[1] * scale))
    if max_pixels is not None and new_size[0] * new_size[1] > max(max_pixels, cw * ch):
        raise BadItem(
            "oversize_image",
            f"{img.size[0]}x{img.size[1]} would be resized to "
            f"{new_size[0]}x{new_size[1]} to cover a {cw}x{ch} crop (aspect ratio too "
            f"extreme; over {max_pixels} pixels)",
        )
    img = img.resize(new_size, resample=Image.Resampling.BICUBIC)
    if rng is None:
        left, top = (img.size[0] - cw) // 2, (img.size[1] - ch) // 2
    else:
        left = rng.randint(0, img.size[0] - cw)
        top = rng.randint(0, img.size[1] - ch)
    box = (left, top, left + cw, top + ch)
    return img.crop(box), box, img.size


def whiten_to_rgb(img: Image.Image) -> np.ndarray:
    """RGB uint8 pixels; transparency blended onto white as the reference does (float64, truncated).

    (Newer transformers releases blend with PIL's ``alpha_composite``, which rounds instead.)
    """
    if img.mode == "RGB":
        return np.array(img)
    rgba = np.array(img.convert("RGBA"))
    if not (rgba[:, :, 3] < 255).any():
        return np.array(img.convert("RGB"))
    alpha = rgba[:, :, 3] / 255.0
    rgb = (1 - alpha[:, :, np.newaxis]) * 255 + alpha[:, :, np.newaxis] * rgba[:, :, :3]
    return rgb.astype("uint8")


def load_image(path: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Open and decode an image; :class:`BadItem` if missing, unreadable or over ``max_pixels``.

    Only regular files are opened: a FIFO or device would block or never end."""
    try:
        if os.path.exists(path) and not os.path.isfile(path):
            raise BadItem("unreadable_image", f"{path}: not a regular file")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            if img.size[0] * img.size[1] > max_pixels:
                raise BadItem(
                    "oversize_image", f"{path}: {img.size[0]}x{img.size[1]} exceeds {max_pixels} pixels"
                )
            img.load()
    except BadItem:
        raise
    except FileNotFoundError:
        raise BadItem("missing_image", f"{path}: no such file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadItem("oversize_image", f"{path}: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:  # PIL's ways of saying "cannot decode"
        raise BadItem("unreadable_image", f"{path}: {type(e).__name__}: {e}") from None
    return img


def load_image_bytes(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """:func:`load_image` of an image held in memory; ``name`` stands for the path in messages."""
    import io

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.size[0] * img.size[1] > max_pixels:
                raise BadItem(
                    "oversize_image", f"{name}: {img.size[0]}x{img.size[1]} exceeds {max_pixels} pixels"
                )
            img.load()
    except BadItem:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadItem("oversize_image", f"{name}: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:  # PIL's ways of saying "cannot decode"
        raise BadItem("unreadable_image", f"{name}: {type(e).__name__}: {e}") from None
    return img


def prepare_image(
    path: str,
    crop_sizes: list[tuple[int, int]],
    rng: Optional[random.Random],
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    data: Optional[bytes] = None,
) -> PreparedImage:
    """Load, pick the crop size, resize and crop, convert to RGB. ``data``: the file's bytes,
    already in memory (a raw shard's member); ``path`` then only names it in messages."""
    img = load_image(path, max_pixels) if data is None else load_image_bytes(data, path, max_pixels)
    orig_size = img.size
    try:
        cropped, box, resized = resize_and_crop(img, pick_crop_size(img.size, crop_sizes), rng, max_pixels)
        pixels = whiten_to_rgb(cropped)
    except BadItem as e:
        raise BadItem(e.reason, f"{path}: {e.message}") from None
    except (OSError, ValueError) as e:  # e.g. modes PIL cannot resize
        raise BadItem("unreadable_image", f"{path}: {type(e).__name__}: {e}") from None
    return PreparedImage(pixels=pixels, crop=box, resized_size=resized, orig_size=orig_size)

"""One input item -> one training sample, in two halves.

- :class:`ItemPreparer` (runs in the background worker processes): adapter hook, validation,
  text tokens and labels with image placeholders, image decoding/resizing/cropping to uint8 RGB.
- :func:`assemble` (runs in the main process once the batched encoder has produced the image
  blocks): splices each block in place of its placeholder; a block's supervision follows its turn.
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import numpy as np

from lumina.conversation import BadItem, parse_conversation, to_standard_item
from lumina.input_items import JsonLine
from lumina.image_processing import DEFAULT_MAX_IMAGE_PIXELS, PreparedImage, crop_rng, crop_size_list, prepare_image
from lumina.text_tokens import IGNORE_INDEX, TextIds, ensure_placeholder, tokenize_conversation

__all__ = ["ItemFailure", "ItemPreparer", "ItemSettings", "PreparedItem", "assemble", "load_adapter"]


@dataclass(frozen=True)
class ItemSettings:
    """Everything a worker needs to prepare items (picklable)."""

    tokenizer: str
    target_size: int = 768
    crop: str = "random"  # "random" (seeded per item) or "center"
    seed: int = 0
    image_root: Optional[str] = None  # relative image paths resolve against it (default: the cwd)
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    adapter: Optional[str] = None  # "module:function" converting your items to the standard format

    def __post_init__(self) -> None:
        if self.crop not in ("random", "center"):
            raise ValueError(f"--crop must be 'random' or 'center', not {self.crop!r}")
        if self.target_size < 32 or self.target_size % 32:
            raise ValueError(f"--target_size must be a positive multiple of 32, not {self.target_size}")


@dataclass
class PreparedItem:
    """Text tokens with one placeholder per image, labels, and the images' cropped pixels."""

    index: int
    item_id: Any
    tokens: np.ndarray
    labels: np.ndarray
    images: list[PreparedImage] = field(default_factory=list)


@dataclass
class ItemFailure:
    """An item that could not be used: its index, ``id`` if any, and why."""

    index: int
    reason: str
    message: str
    item_id: Any = None

    def to_json(self) -> dict:
        record = {"index": self.index, "reason": self.reason, "message": self.message}
        if self.item_id is not None:
            record["id"] = self.item_id
        return record


def load_adapter(spec: Optional[str]) -> Callable[[Any], Any]:
    """The adapter named ``"module:function"``, or the default :func:`to_standard_item`."""
    if not spec:
        return to_standard_item
    module, sep, name = spec.partition(":")
    if not sep:
        raise ValueError(f"--adapter must look like 'module:function', not {spec!r}")
    return getattr(importlib.import_module(module), name)


class ItemPreparer:
    """Callable ``(index, raw_item) -> PreparedItem | ItemFailure``; one per worker process."""

    def __init__(self, settings: ItemSettings):
        from transformers import AutoTokenizer

        self.settings = settings
        self.tokenizer = AutoTokenizer.from_pretrained(settings.tokenizer)
        ensure_placeholder(self.tokenizer)
        self.text_ids = TextIds.from_tokenizer(self.tokenizer)
        self.crop_sizes = crop_size_list(settings.target_size)
        self.adapter = load_adapter(settings.adapter)

    def __call__(self, index: int, raw_item: Any) -> Union[PreparedItem, ItemFailure]:
        item_id = None
        try:
            if isinstance(raw_item, JsonLine):
                raw_item = _parse_line(raw_item)
            item = self.adapter(raw_item)
            item_id = item.get("id") if isinstance(item, dict) else None
            conv = parse_conversation(item)
            tokens, labels = tokenize_conversation(conv, self.tokenizer, self.text_ids)
            images = [self._image(index, k, path) for k, path in enumerate(conv.images)]
        except BadItem as e:
            return ItemFailure(index, e.reason, e.message, item_id)
        except Exception as e:  # noqa: BLE001 - an adapter or library bug: recorded, never hidden
            return ItemFailure(index, "unexpected_error", f"{type(e).__name__}: {e}", item_id)
        return PreparedItem(index, item_id, tokens, labels, images)

    def _image(self, index: int, k: int, path: str) -> PreparedImage:
        s = self.settings
        if s.image_root and not os.path.isabs(path):
            path = os.path.join(s.image_root, path)
        rng = crop_rng(s.seed, index, k) if s.crop == "random" else None
        return prepare_image(path, self.crop_sizes, rng, s.max_image_pixels)


def _parse_line(line: str) -> Any:
    try:
        return json.loads(line)
    except ValueError as e:
        raise BadItem("malformed_item", f"not valid JSON: {e}") from None


def assemble(
    item: PreparedItem, blocks: list[np.ndarray], placeholder_id: int, source: str
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Splice image blocks in place of their placeholders; return ``(input_ids, labels, meta)``."""
    positions = np.flatnonzero(item.tokens == placeholder_id)
    assert len(positions) == len(blocks) == len(item.images), "placeholders, blocks and images disagree"
    ids_parts, label_parts, images_meta = [], [], []
    start, offset = 0, 0
    for pos, block, image in zip(positions, blocks, item.images):
        ids_parts.append(item.tokens[start:pos])
        label_parts.append(item.labels[start:pos])
        offset += pos - start
        supervised = item.labels[pos] != IGNORE_INDEX
        ids_parts.append(block)
        label_parts.append(block if supervised else np.full(len(block), IGNORE_INDEX, dtype=np.int64))
        images_meta.append(_image_meta(int(offset), block, image))
        offset += len(block)
        start = pos + 1
    ids_parts.append(item.tokens[start:])
    label_parts.append(item.labels[start:])
    meta = {"source": source, "index": item.index}
    if item.item_id is not None:
        meta["id"] = item.item_id
    meta["images"] = images_meta
    return np.concatenate(ids_parts), np.concatenate(label_parts), meta


def _image_meta(offset: int, block: np.ndarray, image: PreparedImage) -> dict:
    w, h = image.size
    return {
        "offset": offset,
        "h": h,
        "w": w,
        "grid": [h // 16, w // 16],
        "num_tokens": int(len(block)),
        "crop": list(image.crop),
        "resized_size": list(image.resized_size),
        "orig_size": list(image.orig_size),
    }

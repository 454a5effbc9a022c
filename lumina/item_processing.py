"""One input item -> one training sample, in two halves.

- :class:`ItemPreparer` (runs in the background worker processes): adapter hook, validation,
  text tokens and labels with image placeholders, image decoding/resizing/cropping to uint8 RGB.
  A raw image-text sample (:class:`lumina.raw_shards.RawSample`) becomes a text-to-image
  conversation through ``ItemSettings.template`` (Lumina-mGPT's generation prompt by default,
  with the crop's size), the image in the assistant turn.
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

from lumina.conversation import IMAGE_MARKER, BadItem, Conversation, parse_conversation, to_standard_item
from lumina.image_processing import (
    DEFAULT_MAX_IMAGE_PIXELS,
    PreparedImage,
    crop_rng,
    crop_size_list,
    prepare_image,
)
from lumina.input_items import JsonLine
from lumina.raw_shards import SOURCE_STRIDE, RawSample, caption_of
from lumina.text_tokens import IGNORE_INDEX, TextIds, ensure_placeholder, tokenize_conversation

__all__ = [
    "DEFAULT_TEMPLATE",
    "ItemFailure",
    "ItemPreparer",
    "ItemSettings",
    "PreparedItem",
    "assemble",
    "check_template",
    "load_adapter",
]

# Lumina-mGPT's text-to-image prompt; {w}x{h} is the crop's size in pixels.
DEFAULT_TEMPLATE = "Generate an image of {w}x{h} according to the following prompt:\n{caption}"
TEMPLATE_FIELDS = ("w", "h", "caption")


def check_template(template: str) -> str:
    """Refuse a ``--template`` that lacks ``{caption}`` or names other fields."""
    import string

    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as e:
        raise ValueError(f"--template {template!r}: {e}") from None
    if "caption" not in fields or not fields <= set(TEMPLATE_FIELDS):
        raise ValueError(
            f"--template {template!r}: must contain {{caption}} and only the fields "
            f"{{w}}, {{h}}, {{caption}} (double braces for literal ones)"
        )
    return template


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
    template: str = DEFAULT_TEMPLATE  # raw image-text samples -> the human turn
    caption_key: Optional[str] = None  # raw samples: caption from this .json field (default: .txt)

    def __post_init__(self) -> None:
        check_template(self.template)
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
    source: Optional[str] = None  # the input file or shard it came from (default: the run's)
    next_cursor: Optional[int] = None  # the input index to resume at after it (default: index + 1)
    cursor_state: Optional[dict] = None  # where that is inside a raw shard


@dataclass
class ItemFailure:
    """An item that could not be used: its index, ``id`` if any, and why."""

    index: int
    reason: str
    message: str
    item_id: Any = None
    source: Optional[str] = None
    next_cursor: Optional[int] = None
    cursor_state: Optional[dict] = None

    def to_json(self) -> dict:
        record = {"index": self.index, "reason": self.reason, "message": self.message}
        if self.source is not None:
            record["source"] = self.source
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

    def __call__(
        self, index: int, raw_item: Any, source: Optional[str] = None
    ) -> Union[PreparedItem, ItemFailure]:
        if isinstance(raw_item, RawSample):
            return self._raw(index, raw_item)  # the adapter, if any, sees the RawSample there
        result = self._standard(index, raw_item)
        result.source = source
        return result

    def _standard(self, index: int, raw_item: Any) -> Union[PreparedItem, ItemFailure]:
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

    def _raw(self, index: int, sample: RawSample) -> Union[PreparedItem, ItemFailure]:
        """A raw image-text sample -> the template's text-to-image conversation."""
        s = self.settings
        cursor: dict[str, Any] = {
            "next_cursor": index + 1,
            "source": sample.shard,
            "cursor_state": {
                "shard_no": sample.shard_no,
                "position": sample.position + 1,
                "byte": sample.end,
            },
        }
        if sample.error is not None:  # the rest of the shard is skipped: resume at the next shard
            cursor.update(next_cursor=(sample.shard_no + 1) * SOURCE_STRIDE, cursor_state=None)
            return ItemFailure(index, sample.error[0], sample.error[1], **cursor)
        item_id = sample.key
        try:
            if self.settings.adapter:
                sample = self.adapter(sample)  # e.g. a caption cleaner; must return a RawSample
                if not isinstance(sample, RawSample):
                    raise TypeError(
                        f"--adapter returned {type(sample).__name__} for a raw sample, not a RawSample"
                    )
            if sample.oversize:
                raise BadItem(
                    "oversize_image", f"{sample.shard}: member {sample.oversize} is too large to read"
                )
            image = sample.image_member()
            if image is None:
                raise BadItem(
                    "missing_image",
                    f"{sample.shard}: sample {sample.key!r} has no image member (jpg, jpeg, png, webp)",
                )
            caption = self._caption(sample)
            rng = crop_rng(s.seed, index, 0) if s.crop == "random" else None
            name = f"{sample.shard}:{sample.key}.{image[0]}"
            prepared = prepare_image(name, self.crop_sizes, rng, s.max_image_pixels, data=image[1])
            w, h = prepared.size
            prompt = s.template.format(w=w, h=h, caption=caption)
            conv = Conversation(turns=((False, prompt), (True, IMAGE_MARKER)), images=(name,))
            tokens, labels = tokenize_conversation(conv, self.tokenizer, self.text_ids)
        except BadItem as e:
            return ItemFailure(index, e.reason, e.message, item_id, **cursor)
        except Exception as e:  # noqa: BLE001 - a library bug: recorded, never hidden
            return ItemFailure(index, "unexpected_error", f"{type(e).__name__}: {e}", item_id, **cursor)
        return PreparedItem(index, item_id, tokens, labels, [prepared], **cursor)

    def _caption(self, sample: RawSample) -> str:
        try:
            caption = caption_of(sample, self.settings.caption_key)
        except (ValueError, UnicodeDecodeError) as e:
            raise BadItem(
                "malformed_item", f"{sample.shard}: sample {sample.key!r}: unreadable caption member: {e}"
            ) from None
        if caption is None:
            where = (
                f"field {self.settings.caption_key!r} of .json"
                if self.settings.caption_key
                else ".txt or .json 'caption'"
            )
            raise BadItem(
                "missing_caption", f"{sample.shard}: sample {sample.key!r} has no caption ({where})"
            )
        return caption


def _parse_line(line: str) -> Any:
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        raise BadItem("malformed_item", "the line is not valid UTF-8") from None
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
    meta = {"source": item.source or source, "index": item.index}
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

"""Stage 1: a raw input item -> a validated conversation (turns, image paths).

Follows the reference facts (``LUMINA_TOKENS.md``): turns alternate and start with a human turn;
the second role is spelled ``gpt`` or ``assistant`` (any case); each ``<|image|>`` marker takes the
next image; with images but no marker, ``"<|image|> " * n`` is prepended to the first turn's text.

Every way an item can be unusable raises :class:`BadItem` with a short machine-readable ``reason``;
the pre-tokenizer writes it to the errors file and goes on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "IMAGE_MARKER",
    "BadItem",
    "Conversation",
    "parse_conversation",
    "to_standard_item",
]

IMAGE_MARKER = "<|image|>"
HUMAN_ROLES = ("human",)
ASSISTANT_ROLES = ("gpt", "assistant")


class BadItem(ValueError):
    """An input item that cannot be tokenized. ``reason`` is a short code for the errors file."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Conversation:
    """A validated item: ``turns`` as (is_assistant, text) with markers placed, and image paths."""

    turns: tuple[tuple[bool, str], ...]
    images: tuple[str, ...]


def to_standard_item(raw_item: Any) -> dict:
    """Adapter hook: convert your own item format into the standard one.

    The standard item is ``{"conversations": [{"from": ..., "value": ...}, ...], "image": path or
    [paths] (optional), "id": ... (optional)}``. The default returns the item unchanged. To adapt
    another format, write a function with this signature and pass it as
    ``--adapter my_module:my_function`` (or ``PreTokenizeConfig.adapter``); it runs in the worker
    processes, so it must be importable there. This is the reference's "add your custom codes
    here" spot in ``process_item``, made a function.
    """
    return raw_item


def parse_conversation(item: Any) -> Conversation:
    """Validate a standard item and place its images; raise :class:`BadItem` if unusable."""
    if not isinstance(item, dict) or not isinstance(item.get("conversations"), list):
        raise BadItem("malformed_item", "item is not an object with a 'conversations' list")
    turns = [_parse_turn(i, turn) for i, turn in enumerate(item["conversations"])]
    if not turns:
        raise BadItem("nothing_to_predict", "the conversation has no turns")
    images = _image_list(item.get("image"))
    turns = _place_images(turns, len(images))
    return Conversation(turns=tuple(turns), images=tuple(images))


def _parse_turn(position: int, turn: Any) -> tuple[bool, str]:
    if not isinstance(turn, dict):
        raise BadItem("malformed_item", f"turn {position} is not an object")
    role, value = turn.get("from"), turn.get("value")
    if not isinstance(value, str):
        raise BadItem("non_string_text", f"turn {position} 'value' is {type(value).__name__}, not a string")
    expected = ASSISTANT_ROLES if position % 2 else HUMAN_ROLES
    if not isinstance(role, str) or role.lower() not in expected:
        raise BadItem(
            "non_alternating_roles",
            f"turn {position} is from {role!r}; turns must alternate human / gpt|assistant, starting with human",
        )
    return bool(position % 2), value


def _image_list(image: Any) -> list[str]:
    if image is None:
        return []
    images = image if isinstance(image, list) else [image]
    for path in images:
        if not isinstance(path, str):
            raise BadItem("malformed_item", f"image entry {path!r} is not a path string")
    return images


def _place_images(turns: list[tuple[bool, str]], num_images: int) -> list[tuple[bool, str]]:
    num_markers = sum(text.count(IMAGE_MARKER) for _, text in turns)
    if num_markers == 0 and num_images > 0:
        is_assistant, text = turns[0]
        turns = [(is_assistant, f"{IMAGE_MARKER} " * num_images + text)] + turns[1:]
    elif num_markers != num_images:
        raise BadItem("image_count_mismatch", f"{num_markers} {IMAGE_MARKER} markers but {num_images} images")
    return turns

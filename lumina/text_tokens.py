"""Stage 2: a conversation -> text tokens and labels, with one placeholder id per image.

Reference semantics (``LUMINA_TOKENS.md``): each turn becomes ``value + "<reserved08706>"``; the
whole conversation is tokenized at once with ``add_special_tokens=False`` and the tokenizer's BOS
id prepended; BOS and human turns are unsupervised, assistant turns (separator included) are
supervised. Turn spans are found by tokenizing each turn on its own and checking that the pieces
concatenate to the whole.

"On its own" is the reference's ``Tokenizer.encode_wo_prefix_space``: for tokenizers that do not
add a prefix space (byte-level BPE such as Chameleon's, probed with "Hi my darling"), a turn is
tokenized as is; for sentencepiece-style tokenizers that would add a leading "▁", the turn is
tokenized behind a separator prefix ("@", "\n", ...) that is then cut off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from lumina.conversation import IMAGE_MARKER, BadItem, Conversation

__all__ = [
    "END_OF_TURN",
    "IGNORE_INDEX",
    "TextIds",
    "encode_segment",
    "ensure_placeholder",
    "lookup_token_id",
    "needs_space_before_segment",
    "tokenize_conversation",
]

END_OF_TURN = "<reserved08706>"
IGNORE_INDEX = -100


def lookup_token_id(tokenizer: Any, name: str) -> int:
    """The id of special token ``name``; ``ValueError`` unless it encodes to exactly that one id."""
    token_id = tokenizer.convert_tokens_to_ids(name)
    encoded = tokenizer.encode(name, add_special_tokens=False)
    if token_id is None or token_id == tokenizer.unk_token_id or encoded != [token_id]:
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no single-id token {name!r} "
            f"(encodes to {encoded}); use the Lumina-mGPT/Chameleon tokenizer or lumina.tiny's"
        )
    return token_id


def ensure_placeholder(tokenizer: Any) -> None:
    """Add ``<|image|>`` as a token if missing, as the reference does (``add_tokens``).

    Its id may then lie past the model's vocabulary; it is only a placeholder, never stored.
    """
    if len(tokenizer.encode(IMAGE_MARKER, add_special_tokens=False)) != 1:
        tokenizer.add_tokens([IMAGE_MARKER])


def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def needs_space_before_segment(tokenizer: Any) -> bool:
    """The reference's probe: does a segment cut from a sentence tokenize like it (False), or
    only with its leading space kept (True, e.g. byte-level BPE)?"""
    whole, tail = _encode(tokenizer, "Hi my darling"), _encode(tokenizer, "my darling")
    return whole[-len(tail) :] != tail


@dataclass(frozen=True)
class TextIds:
    """The ids the text stage needs, looked up by name, and the tokenizer's segment style."""

    bos: int
    end_of_turn: int
    placeholder: int
    space_before_segment: bool = True

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> "TextIds":
        """Call :func:`ensure_placeholder` first."""
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if bos is None:
            raise ValueError(
                "the text tokenizer has neither a BOS nor an EOS token; the reference prepends BOS"
            )
        return cls(
            bos=bos,
            end_of_turn=lookup_token_id(tokenizer, END_OF_TURN),
            placeholder=lookup_token_id(tokenizer, IMAGE_MARKER),
            space_before_segment=needs_space_before_segment(tokenizer),
        )


_SEGMENT_PREFIXES = ("@", "\n", "\\", "=", ">", "`")


def encode_segment(tokenizer: Any, text: str, space_before_segment: bool) -> list[int]:
    """A turn tokenized on its own, as the reference's ``encode_wo_prefix_space``."""
    if space_before_segment:
        return _encode(tokenizer, text)
    for prefix in _SEGMENT_PREFIXES:
        prefix_tokens = _encode(tokenizer, prefix)
        joined = _encode(tokenizer, prefix + text)
        if joined[: len(prefix_tokens)] == prefix_tokens:
            return joined[len(prefix_tokens) :]
    raise BadItem("tokenization_mismatch", "every separator prefix merges into the turn text")


def tokenize_conversation(conv: Conversation, tokenizer: Any, ids: TextIds) -> tuple[np.ndarray, np.ndarray]:
    """Tokens (BOS first, ``ids.placeholder`` where images go) and labels (``-100`` unsupervised)."""
    pieces = [text + END_OF_TURN for _, text in conv.turns]
    whole = _encode(tokenizer, "".join(pieces))
    per_turn = [_encode(tokenizer, pieces[0])]
    per_turn += [encode_segment(tokenizer, p, ids.space_before_segment) for p in pieces[1:]]
    if [t for piece in per_turn for t in piece] != whole:
        raise BadItem("tokenization_mismatch", "turns tokenized separately do not concatenate to the whole")
    tokens = np.array([ids.bos] + whole, dtype=np.int64)
    labels = np.full(len(tokens), IGNORE_INDEX, dtype=np.int64)
    start = 1
    for (is_assistant, _), piece in zip(conv.turns, per_turn):
        if is_assistant:
            labels[start : start + len(piece)] = piece
        start += len(piece)
    if not (labels != IGNORE_INDEX).any():
        raise BadItem("nothing_to_predict", "no assistant turn to train on")
    num_placeholders = int((tokens == ids.placeholder).sum())
    if num_placeholders != len(conv.images):
        raise BadItem(
            "image_count_mismatch", f"{num_placeholders} placeholder tokens but {len(conv.images)} images"
        )
    return tokens, labels

"""Packed rows for the model: several samples per row, attention kept inside each sample.

The loader's packed batches (``build_loader(..., pack=True)``, ``wds_tools.collate.pack_batch``)
carry ``position_ids`` (restarting at 0 in every sample) and ``segment_ids`` (1, 2, ... per sample
of a row, 0 on the padding at a row's end), and the first token of every sample has label -100,
so the shifted loss never predicts a sample's first token from the previous sample. What is left
is attention: no token may attend across a sample boundary. How depends on the attention kernel:

- ``eager`` / ``sdpa`` (CPU, or GPUs without a variable-length kernel): a block-diagonal causal
  mask ``[B, 1, T, T]`` (boolean for sdpa, additive for eager), built from the segment ids;
  transformers passes a 4-D mask through unchanged.
- ``flash_attention_2`` / ``flash_attention_3``: the rows are laid end to end as one row
  ``[1, B*T]`` with their position ids and no mask; transformers sees the restarts in the
  position ids and calls flash-attention's variable-length kernel (no ``T x T`` mask at all).
  Exact because every row starts with a sample whose first label is -100.
- ``flex_attention``: a ``BlockMask`` of the document-causal rule (PyTorch flex attention); only
  blocks that hold allowed pairs are computed.

The padding at a row's end is segment 0: it attends to itself only, its labels are -100, so it
never touches a real token's loss or gradient.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

__all__ = [
    "DENSE_MASK_IMPLEMENTATIONS",
    "VARLEN_IMPLEMENTATIONS",
    "block_causal_mask",
    "check_packed_path",
    "document_block_mask",
    "model_inputs",
    "packed_model_inputs",
    "sample_lengths",
    "varlen_available",
]

DENSE_MASK_IMPLEMENTATIONS = ("eager", "sdpa")
VARLEN_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3", "flex_attention")


def block_causal_mask(segment_ids: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``[B, 1, T, T]``: query ``q`` may attend key ``k`` when both are in the same segment and
    ``k <= q``. Boolean (True = attend) when ``dtype`` is None, else additive (0 where allowed,
    the dtype's minimum elsewhere), as eager attention adds it to the scores."""
    t = segment_ids.shape[-1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(t, t, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = (same & causal)[:, None]
    if dtype is None:
        return allowed
    out = torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device)
    return out.masked_fill_(~allowed, torch.finfo(dtype).min)


def document_block_mask(segment_ids: torch.Tensor) -> Any:
    """The document-causal rule of :func:`block_causal_mask` as a flex-attention ``BlockMask``."""
    from torch.nn.attention.flex_attention import create_block_mask

    seg = segment_ids

    def mask_mod(b, h, q, k):
        return (seg[b, q] == seg[b, k]) & (k <= q)

    b, t = seg.shape
    return create_block_mask(mask_mod, B=b, H=None, Q_LEN=t, KV_LEN=t, device=seg.device)


def packed_model_inputs(
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    position_ids: torch.Tensor,
    segment_ids: torch.Tensor,
    attn_implementation: str,
    dtype: torch.dtype,
) -> dict:
    """The model's keyword inputs of a packed batch (tensors on the compute device):
    ``input_ids``, ``labels``, ``position_ids``, ``attention_mask`` for ``attn_implementation``.

    With a flash-attention kernel the rows are flattened to one (see the module docstring); the
    loss positions must then be computed from the returned ``labels``."""
    if attn_implementation in DENSE_MASK_IMPLEMENTATIONS:
        mask = block_causal_mask(segment_ids, None if attn_implementation == "sdpa" else dtype)
        return {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": position_ids,
            "attention_mask": mask,
        }
    if attn_implementation == "flex_attention":
        return {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": position_ids,
            "attention_mask": document_block_mask(segment_ids),
        }
    if attn_implementation.startswith("flash_attention"):
        return {
            "input_ids": input_ids.reshape(1, -1),
            "labels": labels.reshape(1, -1),
            "position_ids": position_ids.reshape(1, -1),
            "attention_mask": None,
        }
    raise ValueError(
        f"--pack: attention implementation {attn_implementation!r} has no packed "
        f"path (use one of {', '.join(DENSE_MASK_IMPLEMENTATIONS + VARLEN_IMPLEMENTATIONS)})"
    )


def model_inputs(
    batch: dict, attn_implementation: str, dtype: torch.dtype, device: Optional[torch.device] = None
) -> dict:
    """The keyword inputs of :class:`lumina.model.LuminaChameleon` for a loader batch, padded
    or packed (``segment_ids`` present), on ``device`` (pinned, asynchronous copies on GPUs).

    ``positions`` (the supervised shifted positions) are computed from the CPU labels: no device
    sync. A right-padded batch (the loader's layout) goes without an attention mask: under the
    causal mask a real token never attends to the padding after it, so every supervised position
    is unchanged, and attention takes its fused ``is_causal`` path (transformers would check an
    all-ones mask with a host sync).
    """
    from lumina.loss import supervised_positions

    device = device or torch.device("cpu")
    pin = device.type == "cuda"

    def move(t: torch.Tensor) -> torch.Tensor:
        return (t.pin_memory() if pin else t).to(device, non_blocking=pin)

    labels = batch["labels"]
    if "segment_ids" in batch:
        if flattens_rows(attn_implementation):
            labels = labels.reshape(1, -1)
        out = packed_model_inputs(
            move(batch["input_ids"]),
            move(batch["labels"]),
            move(batch["position_ids"]),
            move(batch["segment_ids"]),
            attn_implementation,
            dtype,
        )
    else:
        mask = batch["attention_mask"]
        right_padded = bool((mask[:, 1:] <= mask[:, :-1]).all())  # CPU tensor: no device sync
        out = {
            "input_ids": move(batch["input_ids"]),
            "labels": move(labels),
            "attention_mask": None if right_padded else move(mask),
        }
    out["positions"] = move(supervised_positions(labels))
    return out


def flattens_rows(attn_implementation: str) -> bool:
    """Whether :func:`packed_model_inputs` lays the rows end to end as one."""
    return attn_implementation.startswith("flash_attention")


def varlen_available(attn_implementation: str) -> bool:
    """Whether this machine can run ``attn_implementation``'s packed path (CUDA, and the
    flash-attention package for ``flash_attention_*``)."""
    if not torch.cuda.is_available():
        return False
    from importlib.util import find_spec

    if attn_implementation == "flex_attention":
        return find_spec("torch.nn.attention.flex_attention") is not None
    if attn_implementation.startswith("flash_attention"):
        return (
            find_spec("flash_attn" if attn_implementation == "flash_attention_2" else "flash_attn_interface")
            is not None
        )
    return False


def check_packed_path(attn_implementation: str) -> None:
    """Refuse, with one line naming the flag, a packed path this machine cannot run (the
    variable-length kernels need CUDA, and flash-attention its package)."""
    if attn_implementation in DENSE_MASK_IMPLEMENTATIONS or varlen_available(attn_implementation):
        return
    need = "CUDA" + (" and the flash-attn package" if attn_implementation.startswith("flash") else "")
    raise ValueError(
        f"--pack with --attn_implementation {attn_implementation} needs {need}; use sdpa or eager here"
    )


def sample_lengths(attention_mask: torch.Tensor, segment_ids: Optional[torch.Tensor] = None) -> list[int]:
    """Real tokens of every sample of a batch, in order: row lengths of a right-padded batch, or
    the segment lengths of a packed one (host tensors: no device sync)."""
    if segment_ids is None:
        return attention_mask.sum(dim=1).tolist()
    out: list[int] = []
    for row in segment_ids:
        counts = torch.bincount(row)[1:].tolist()
        out.extend(n for n in counts if n)
    return out

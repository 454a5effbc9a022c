"""The reference Lumina-mGPT loss, computed in chunks from hidden states and the lm_head weight.

loss = mean over supervised positions of cross-entropy(logits, next token)
     + z_loss_weight * mean over the same positions of logsumexp(logits)^2

Positions are shifted (the hidden state at t predicts the label at t+1); a position is supervised
when its shifted label is not -100. Only supervised positions get logits, and they get them a
chunk at a time, each chunk under activation checkpointing, so at most one chunk of
``chunk_size x vocab`` fp32 logits exists at once, in the forward and in the backward pass (the
reference materialised fp32 logits for the whole batch). Image-token logits are left unmasked
unless ``mask_token_ids`` is given: transformers' Chameleon masks them to -inf, which makes image
tokens unlearnable.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = ["IGNORE_INDEX", "LossOutput", "supervised_positions", "chunked_lm_loss"]

IGNORE_INDEX = -100


class LossOutput(NamedTuple):
    """``loss`` carries the gradient; the rest are detached fp32 sums for logging.

    A NamedTuple (not a dataclass) so that ZeRO-3 finds the tensors in a module's output and
    hooks its backward pass.
    """

    loss: torch.Tensor
    ce_sum: torch.Tensor
    z_sum: torch.Tensor
    num_tokens: int


def supervised_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices into ``[B * (T - 1)]`` of the shifted positions that are trained on.

    Call it on the CPU copy of the labels (as the trainer does) to avoid a device sync.
    """
    shifted = labels[:, 1:].reshape(-1)
    return (shifted != IGNORE_INDEX).nonzero().squeeze(1)


def _chunk_terms(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                 mask_token_ids: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    # lm_head in the model's dtype (as the reference), cross-entropy in fp32.
    logits = F.linear(hidden, weight).float()
    if mask_token_ids is not None:
        logits = logits.index_fill(1, mask_token_ids, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    target_logit = logits.gather(1, targets.unsqueeze(1)).squeeze(1)
    return (lse - target_logit).sum(), lse.square().sum()


def chunked_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    z_loss_weight: float = 1e-5,
    chunk_size: int = 2048,
    positions: Optional[torch.Tensor] = None,
    mask_token_ids: Optional[torch.Tensor] = None,
) -> LossOutput:
    """Token-mean cross-entropy plus z-loss over supervised shifted positions.

    Args:
        hidden: final hidden states ``[B, T, H]`` (after the last norm).
        weight: lm_head weight ``[V, H]``.
        labels: ``[B, T]``, -100 where not trained on (unshifted: label t is the token at t).
        z_loss_weight: weight of ``mean(logsumexp^2)``.
        chunk_size: supervised positions per chunk.
        positions: precomputed :func:`supervised_positions` (any device); computed if None.
        mask_token_ids: vocabulary ids whose logits are set to -inf (None: no masking).
    """
    batch, length, dim = hidden.shape
    flat_hidden = hidden[:, :-1].reshape(batch * (length - 1), dim)
    flat_targets = labels[:, 1:].reshape(-1)
    if positions is None:
        positions = supervised_positions(labels)
    num_tokens = int(positions.numel())
    scale = 1.0
    if num_tokens == 0:
        # Still run one chunk (scaled to zero): under ZeRO-3 every rank must produce gradients
        # for the same parameters, or the reduce-scatter of another rank waits forever.
        positions, scale = torch.zeros(1, dtype=torch.long), 0.0
    positions = positions.to(hidden.device, non_blocking=True)
    sel_hidden = flat_hidden.index_select(0, positions)
    sel_targets = flat_targets.to(hidden.device).index_select(0, positions)
    if scale == 0.0:
        sel_targets = sel_targets.clamp_min(0)
    if mask_token_ids is not None:
        mask_token_ids = mask_token_ids.to(hidden.device)

    ce_sum = hidden.new_zeros((), dtype=torch.float32)
    z_sum = hidden.new_zeros((), dtype=torch.float32)
    use_ckpt = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    for start in range(0, sel_hidden.shape[0], chunk_size):
        args = (sel_hidden[start:start + chunk_size], weight,
                sel_targets[start:start + chunk_size], mask_token_ids)
        if use_ckpt:
            ce, z = checkpoint(_chunk_terms, *args, use_reentrant=False)
        else:
            ce, z = _chunk_terms(*args)
        ce_sum = ce_sum + ce
        z_sum = z_sum + z
    denom = float(max(num_tokens, 1))
    loss = (ce_sum + z_loss_weight * z_sum) * (scale / denom)
    return LossOutput(loss=loss, ce_sum=ce_sum.detach() * scale, z_sum=z_sum.detach() * scale,
                      num_tokens=num_tokens)


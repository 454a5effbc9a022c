"""The reference Lumina-mGPT loss, computed in chunks from hidden states and the lm_head weight.

loss = mean over supervised positions of cross-entropy(logits, next token)
     + z_loss_weight * mean over the same positions of logsumexp(logits)^2

Positions are shifted (the hidden state at t predicts the label at t+1); a position is supervised
when its shifted label is not -100. Only supervised positions get logits, and they get them a
chunk at a time: a custom autograd function computes each chunk's loss and its gradients with
respect to the hidden states and the lm_head weight while the chunk's fp32 logits exist, then
drops them. At most one ``chunk_size x vocab`` block of fp32 logits exists at once (the reference
materialised fp32 logits for the whole batch), and nothing is recomputed in the backward pass.
Image-token logits are left unmasked unless ``mask_token_ids`` is given: transformers' Chameleon
masks them to -inf, which makes image tokens unlearnable.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

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


class _LinearCrossEntropy(torch.autograd.Function):
    """``sum(CE) + z_w * sum(lse^2)``, times ``scale``, of ``hidden @ weight.T``, chunk by chunk.

    The gradients are computed in the forward pass, chunk by chunk, while the chunk's logits
    exist: ``dlogits = (softmax * (1 + 2 z_w lse) - onehot) * scale``, then
    ``grad_hidden = dlogits @ W`` and ``grad_W += dlogits.T @ hidden``. Nothing of size
    ``N x vocab`` outlives a chunk, and nothing is recomputed in the backward pass (which only
    scales the stored gradients): the FLOPs of a plain forward + backward, the memory of one chunk.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, z_w, chunk, mask_ids, scale):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = None
        ce_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        z_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        num = hidden.shape[0]
        for start in range(0, num, chunk):
            h, y = hidden[start : start + chunk], targets[start : start + chunk]
            # lm_head in the model's dtype (as the reference), cross-entropy in fp32.
            logits = F.linear(h, weight).float()
            if mask_ids is not None:
                logits.index_fill_(1, mask_ids, float("-inf"))
            lse = torch.logsumexp(logits, dim=-1)
            target_logit = logits.gather(1, y.unsqueeze(1)).squeeze(1)
            ce_sum += (lse - target_logit).sum()
            z_sum += lse.square().sum()
            if not (need_h or need_w):
                continue
            probs = logits.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place of the logits
            probs.mul_(((1.0 + 2.0 * z_w * lse) * scale).unsqueeze(1))
            probs.scatter_add_(1, y.unsqueeze(1), torch.full_like(lse, -scale).unsqueeze(1))
            dlogits = probs.to(hidden.dtype)
            del probs, logits
            if need_h:
                grad_h[start : start + chunk] = dlogits @ weight
            if need_w:
                part = dlogits.t() @ h
                if grad_w is None:
                    grad_w = part if num <= chunk else part.float()
                else:
                    grad_w += part
        ctx.grads, ctx.weight_dtype = (grad_h, grad_w), weight.dtype
        loss = (ce_sum + z_w * z_sum) * scale
        ctx.mark_non_differentiable(ce_sum, z_sum)
        return loss, ce_sum, z_sum

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_z):
        grad_h, grad_w = ctx.grads
        ctx.grads = None
        if grad_h is not None:
            grad_h = grad_h * grad_loss.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = (grad_w * grad_loss).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None, None


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

    denom = float(max(num_tokens, 1))
    loss, ce_sum, z_sum = _LinearCrossEntropy.apply(
        sel_hidden, weight, sel_targets, float(z_loss_weight), int(chunk_size), mask_token_ids, scale / denom
    )
    return LossOutput(loss=loss, ce_sum=ce_sum * scale, z_sum=z_sum * scale, num_tokens=num_tokens)

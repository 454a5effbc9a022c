"""transformers' Chameleon, built or loaded under ZeRO-3, wrapped with the reference loss.

:func:`build_model` keeps an ``HfDeepSpeedConfig`` alive while the model is built, so
``from_pretrained`` / ``_from_config`` partition every parameter as it is created (ZeRO-3 never
holds the whole model on one rank). :class:`LuminaChameleon` is the module DeepSpeed trains: it runs
the decoder for hidden states and computes the chunked loss of :mod:`lumina.loss` from them and the
``lm_head`` weight, never through ``ChameleonForConditionalGeneration.forward`` (which masks
image-token logits to -inf and materialises the full logits).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lumina.loss import LossOutput, chunked_lm_loss
from lumina.train_config import ConfigError, LossConfig, ModelConfig

__all__ = ["LuminaChameleon", "build_model", "image_token_ids", "is_zero3_param"]

log = logging.getLogger(__name__)


def image_token_ids(config: Any) -> list[int]:
    """Vocabulary ids of the VQ image codes (the ``IMGIMG...`` tokens) of a ChameleonConfig."""
    vocab = getattr(config, "vocabulary_map", None)
    if not vocab:
        raise ConfigError(
            "the Chameleon config has no vocabulary_map; the model cannot tell "
            "image tokens apart (check --init_from / --model_config)"
        )
    return sorted(int(i) for name, i in vocab.items() if name.startswith("IMGIMG"))


def is_zero3_param(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


class LuminaChameleon(nn.Module):
    """Chameleon plus the reference loss; ``forward`` returns a :class:`LossOutput`."""

    def __init__(self, chameleon: Any, loss: LossConfig) -> None:
        super().__init__()
        self.chameleon: Any = chameleon  # a ChameleonForConditionalGeneration
        self.z_loss_weight = loss.z_loss_weight
        self.chunk_size = loss.loss_chunk_size
        ids = image_token_ids(chameleon.config)
        self.image_ids: torch.Tensor
        self.register_buffer("image_ids", torch.tensor(ids, dtype=torch.long), persistent=False)
        self.mask_image_logits = loss.mask_image_logits
        weight = chameleon.lm_head.weight
        if is_zero3_param(weight):
            # The loss reads lm_head.weight in this module's forward, not lm_head's: tell ZeRO-3
            # to gather it around this module's forward and backward.
            import deepspeed

            deepspeed.zero.register_external_parameter(self, weight)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[Any] = None,
        position_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Final hidden states. ``attention_mask``: a 2-D padding mask, a prepared 4-D mask or
        flex ``BlockMask`` (packed rows, :mod:`lumina.packing`), or None (causal);
        ``position_ids``: per-sample positions of packed rows (default 0..T-1)."""
        out = self.chameleon.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
        return out.last_hidden_state

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: Optional[Any] = None,
        positions: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
    ) -> LossOutput:
        hidden = self.hidden_states(input_ids, attention_mask, position_ids)
        return chunked_lm_loss(
            hidden,
            self.chameleon.lm_head.weight,
            labels,
            z_loss_weight=self.z_loss_weight,
            chunk_size=self.chunk_size,
            positions=positions,
            mask_token_ids=self.image_ids if self.mask_image_logits else None,
        )

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Full, unmasked logits ``[B, T, V]`` (small inputs only: evaluation and tests)."""
        hidden = self.hidden_states(input_ids, attention_mask)
        return F.linear(hidden, self.chameleon.lm_head.weight).float()


def _add_residual_dropout(chameleon: Any, p: float) -> None:
    """Dropout on the attention and MLP outputs before the residual add (reference option)."""

    def drop_first(module, args, output):
        if isinstance(output, tuple):
            return (F.dropout(output[0], p, module.training),) + tuple(output[1:])
        return F.dropout(output, p, module.training)

    for layer in chameleon.model.layers:
        layer.self_attn.register_forward_hook(drop_first)
        layer.mlp.register_forward_hook(drop_first)


def _zero_image_rows(chameleon: Any, rank: int) -> None:
    weight = chameleon.lm_head.weight
    ids = torch.tensor(image_token_ids(chameleon.config), dtype=torch.long)
    if is_zero3_param(weight):
        import deepspeed

        with deepspeed.zero.GatheredParameters([weight], modifier_rank=0):
            if rank == 0:
                weight.data.index_fill_(0, ids.to(weight.device), 0.0)
    else:
        with torch.no_grad():
            weight.index_fill_(0, ids.to(weight.device), 0.0)


def _load_config(path: str) -> Any:
    from transformers import ChameleonConfig

    if os.path.isdir(path) or path.endswith(".json"):
        if path.endswith(".json"):
            return ChameleonConfig.from_json_file(path)
        return ChameleonConfig.from_pretrained(path)
    raise ConfigError(f"--model_config {path!r}: expected a config.json or a folder holding one")


def build_model(
    cfg: ModelConfig,
    loss: LossConfig,
    ds_config: Optional[dict],
    rank: int = 0,
    zero_image_rows: bool = False,
) -> tuple[LuminaChameleon, Any]:
    """Build (random, from ``cfg.model_config``) or load (``cfg.init_from``) the model.

    With a ZeRO-3 ``ds_config``, parameters are partitioned while they are created. Returns the
    model and the ``HfDeepSpeedConfig`` handle, which the caller must keep alive until
    ``deepspeed.initialize`` has run. ``zero_image_rows`` applies ``cfg.zero_image_lm_head`` (the
    trainer passes False when resuming: the checkpoint's weights win anyway).
    """
    from transformers import ChameleonForConditionalGeneration

    handle = None
    if ds_config is not None:
        from transformers.integrations.deepspeed import HfDeepSpeedConfig

        handle = HfDeepSpeedConfig(ds_config)
    bf16 = bool(ds_config and ds_config.get("bf16", {}).get("enabled", False))
    dtype = torch.bfloat16 if bf16 else torch.float32
    kwargs: dict[str, Any] = dict(dtype=dtype, attn_implementation=cfg.attn_implementation)
    chameleon: Any
    if cfg.init_from is not None:
        chameleon = ChameleonForConditionalGeneration.from_pretrained(cfg.init_from, **kwargs)
    else:
        assert cfg.model_config is not None  # ModelConfig checks one of the two is set
        config = _load_config(cfg.model_config)
        chameleon = ChameleonForConditionalGeneration._from_config(config, **kwargs)
    image_token_ids(chameleon.config)  # fail early without a vocabulary_map
    chameleon.config.use_cache = False
    if cfg.vq == "drop":
        chameleon.model.vqmodel = None
    else:
        chameleon.model.vqmodel.requires_grad_(False)
    if cfg.gradient_checkpointing:
        chameleon.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.residual_dropout > 0:
        _add_residual_dropout(chameleon, cfg.residual_dropout)
    if zero_image_rows and cfg.zero_image_lm_head:
        _zero_image_rows(chameleon, rank)
    return LuminaChameleon(chameleon, loss), handle


def optimizer_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two AdamW groups: matrices decay, norms and biases do not."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        shape = getattr(param, "ds_shape", param.shape)
        (decay if len(shape) >= 2 and "norm" not in name else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]

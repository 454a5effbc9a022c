"""Meta's Chameleon VQGAN: encoder, vector quantizer and decoder, loaded safely.

transformers' Chameleon carries only the VQ *encoder* (``ChameleonVQVAE``); turning image tokens
back into pictures needs the decoder, so this module holds the whole model in the layout of
Meta's original code (taming-transformers' ``Encoder``/``Decoder``, which Lumina-mGPT carries as
``chameleon_vae_ori/vqgan.py``). Its state-dict keys are Meta's, the ones of ``vqgan.ckpt``::

    encoder.*  quant_conv.*  quantize.embedding.weight  post_quant_conv.*  decoder.*

transformers' ``vqmodel`` uses the same names for its part (``encoder.*``, ``quant_conv.*``,
``quantize.*``), so weights move between the two unchanged.

Files: ``vqgan.yaml`` (``model.params``: ``n_embed``, ``embed_dim``, ``ddconfig``) and
``vqgan.ckpt`` (``{"state_dict": {...}}``) or ``vqgan.safetensors``. A ``.ckpt`` is read with
``torch.load(weights_only=True)``: tensors only, nothing is executed; a checkpoint that needs
code objects to unpickle is refused with the command that converts it once (see
:func:`load_state_dict_file`).

Pixels are ``x / 255 * 2 - 1`` on the way in and ``uint8((clamp(y, -1, 1) + 1) / 2 * 255)`` on
the way out, as Meta's ``ImageTokenizer`` does.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DOWNSAMPLE",
    "VQGAN",
    "CheckpointError",
    "Decoder",
    "Encoder",
    "VQGANConfig",
    "VectorQuantizer",
    "codes_to_pixels",
    "load_state_dict_file",
    "load_vqgan",
    "pixels_to_uint8",
    "save_vqgan",
]

DOWNSAMPLE = 16  # Chameleon's: 5 resolution levels, 4 stride-2 steps

CONVERT_HINT = (
    'convert it once, where you trust the file: python -c "import torch, safetensors.torch as s; '
    "s.save_file(torch.load('vqgan.ckpt', weights_only=False)['state_dict'], "
    "'vqgan.safetensors')\" (docs/inspect.md)"
)


class CheckpointError(ValueError):
    """A VQGAN checkpoint or config that cannot be used (missing, unsafe, wrong shapes)."""


@dataclass(frozen=True)
class VQGANConfig:
    """``vqgan.yaml``'s ``model.params``: ``ddconfig`` fields plus ``n_embed`` and ``embed_dim``.

    The defaults are the real Chameleon tokenizer's (transformers' ``ChameleonVQVAEConfig``
    defaults hold the same numbers).
    """

    ch: int = 128
    ch_mult: tuple = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple = ()
    z_channels: int = 256
    double_z: bool = False
    in_channels: int = 3
    out_ch: int = 3
    resolution: int = 512
    dropout: float = 0.0
    attn_type: str = "vanilla"
    n_embed: int = 8192
    embed_dim: int = 256

    _DD_FIELDS = (
        "ch",
        "ch_mult",
        "num_res_blocks",
        "attn_resolutions",
        "z_channels",
        "double_z",
        "in_channels",
        "out_ch",
        "resolution",
        "dropout",
        "attn_type",
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        object.__setattr__(self, "attn_resolutions", tuple(int(r) for r in self.attn_resolutions or ()))
        if self.attn_type not in ("vanilla", "none"):
            raise CheckpointError(
                f"vqgan.yaml: attn_type {self.attn_type!r} is not supported (vanilla or none)"
            )
        for name, channels in (("ch", self.ch), ("z_channels", self.z_channels)):
            if channels % 32:
                raise CheckpointError(
                    f"vqgan.yaml: {name}={channels} is not a multiple of 32 (GroupNorm with 32 groups)"
                )

    @classmethod
    def from_yaml_dict(cls, doc: Any, where: str = "vqgan.yaml") -> VQGANConfig:
        """From a parsed ``vqgan.yaml`` (``model.params``) or its ``params`` mapping itself."""
        params = doc.get("model", {}).get("params", doc) if isinstance(doc, dict) else None
        if not isinstance(params, dict) or not isinstance(params.get("ddconfig"), dict):
            raise CheckpointError(f"{where}: no model.params.ddconfig (not a VQGAN config)")
        dd = params["ddconfig"]
        missing = [k for k in ("n_embed", "embed_dim") if k not in params]
        missing += [k for k in ("ch", "ch_mult", "num_res_blocks", "z_channels") if k not in dd]
        if missing:
            raise CheckpointError(f"{where}: missing {', '.join(missing)}")
        kwargs = {k: dd[k] for k in cls._DD_FIELDS if k in dd}
        return cls(n_embed=int(params["n_embed"]), embed_dim=int(params["embed_dim"]), **kwargs)

    @classmethod
    def from_yaml(cls, path: str) -> VQGANConfig:
        import yaml

        try:
            with open(path, encoding="utf-8") as f:
                doc = yaml.safe_load(f)
        except FileNotFoundError:
            raise CheckpointError(f"{path}: no such file") from None
        except yaml.YAMLError as e:
            raise CheckpointError(f"{path}: not YAML: {str(e).splitlines()[0]}") from None
        return cls.from_yaml_dict(doc, path)

    def to_yaml_dict(self) -> dict:
        """The ``vqgan.yaml`` document (Meta's layout, without the training-only ``lossconfig``)."""
        dd = {k: getattr(self, k) for k in self._DD_FIELDS}
        dd["ch_mult"], dd["attn_resolutions"] = list(self.ch_mult), list(self.attn_resolutions)
        return {
            "model": {
                "target": "taming.models.vqgan.VQModel",
                "params": {"embed_dim": self.embed_dim, "n_embed": self.n_embed, "ddconfig": dd},
            }
        }

    @classmethod
    def from_transformers(cls, vq: Any) -> VQGANConfig:
        """From a ``ChameleonVQVAEConfig`` (or its dict): the inverse of transformers' converter."""
        d = vq if isinstance(vq, dict) else vq.to_dict()
        return cls(
            ch=d["base_channels"],
            ch_mult=d["channel_multiplier"],
            num_res_blocks=d["num_res_blocks"],
            attn_resolutions=d.get("attn_resolutions") or (),
            z_channels=d["latent_channels"],
            double_z=d.get("double_latent", False),
            in_channels=d.get("in_channels", 3),
            resolution=d.get("resolution", 512),
            dropout=d.get("dropout", 0.0),
            attn_type=d.get("attn_type", "vanilla"),
            n_embed=d["num_embeddings"],
            embed_dim=d["embed_dim"],
        )

    def to_transformers(self) -> dict:
        """``ChameleonVQVAEConfig`` fields for the same architecture (encoder side)."""
        return {
            "embed_dim": self.embed_dim,
            "num_embeddings": self.n_embed,
            "double_latent": self.double_z,
            "latent_channels": self.z_channels,
            "resolution": self.resolution,
            "in_channels": self.in_channels,
            "base_channels": self.ch,
            "channel_multiplier": list(self.ch_mult),
            "num_res_blocks": self.num_res_blocks,
            "attn_resolutions": list(self.attn_resolutions) or None,
            "dropout": self.dropout,
            "attn_type": self.attn_type,
        }


# ----------------------------------------------------------------------------------------------
# Modules (taming-transformers' layout and parameter names)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions (1x1 convolutions for q, k, v, out)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        b, c, hh, ww = h.shape
        q = self.q(h).reshape(b, c, hh * ww).transpose(1, 2)
        k = self.k(h).reshape(b, c, hh * ww)
        v = self.v(h).reshape(b, c, hh * ww)
        weights = F.softmax(torch.bmm(q, k) * (int(c) ** -0.5), dim=2)
        out = torch.bmm(v, weights.transpose(1, 2)).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # taming's asymmetric padding


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _attn(cfg: VQGANConfig, channels: int) -> nn.Module:
    return AttnBlock(channels) if cfg.attn_type == "vanilla" else nn.Identity()


class _Mid(nn.Module):
    """``block_1 -> attn_1 -> block_2`` at the lowest resolution."""

    def __init__(self, cfg: VQGANConfig, channels: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, cfg.dropout)
        self.attn_1 = _attn(cfg, channels)
        self.block_2 = ResnetBlock(channels, channels, cfg.dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class _Level(nn.Module):
    """One resolution level: residual blocks (each followed by attention where configured),
    then ``downsample`` (encoder) or ``upsample`` (decoder), absent at the last level."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()
        self.downsample: Optional[Downsample] = None
        self.upsample: Optional[Upsample] = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn) > 0:
                h = self.attn[i](h)
        if self.downsample is not None:
            h = self.downsample(h)
        if self.upsample is not None:
            h = self.upsample(h)
        return h


class Encoder(nn.Module):
    """Pixels ``(B, 3, H, W)`` in [-1, 1] -> latents ``(B, z_channels, H/f, W/f)``."""

    def __init__(self, cfg: VQGANConfig) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        in_mult = (1,) + cfg.ch_mult
        res, block_in = cfg.resolution, cfg.ch
        self.down = nn.ModuleList()
        for level, mult in enumerate(cfg.ch_mult):
            level_mod = _Level()
            block_in = cfg.ch * in_mult[level]
            for _ in range(cfg.num_res_blocks):
                level_mod.block.append(ResnetBlock(block_in, cfg.ch * mult, cfg.dropout))
                block_in = cfg.ch * mult
                if res in cfg.attn_resolutions:
                    level_mod.attn.append(_attn(cfg, block_in))
            if level != len(cfg.ch_mult) - 1:
                level_mod.downsample = Downsample(block_in)
                res //= 2
            self.down.append(level_mod)
        self.mid = _Mid(cfg, block_in)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(
            block_in, 2 * cfg.z_channels if cfg.double_z else cfg.z_channels, 3, padding=1
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level_mod in self.down:
            h = level_mod(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    """Latents ``(B, z_channels, h, w)`` -> pixels ``(B, out_ch, h*f, w*f)``, about [-1, 1]."""

    def __init__(self, cfg: VQGANConfig) -> None:
        super().__init__()
        block_in = cfg.ch * cfg.ch_mult[-1]
        res = cfg.resolution // 2 ** (len(cfg.ch_mult) - 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = _Mid(cfg, block_in)
        levels: list[nn.Module] = []
        for level in reversed(range(len(cfg.ch_mult))):
            level_mod = _Level()
            block_out = cfg.ch * cfg.ch_mult[level]
            for _ in range(cfg.num_res_blocks + 1):
                level_mod.block.append(ResnetBlock(block_in, block_out, cfg.dropout))
                block_in = block_out
                if res in cfg.attn_resolutions:
                    level_mod.attn.append(_attn(cfg, block_in))
            if level != 0:
                level_mod.upsample = Upsample(block_in)
                res *= 2
            levels.insert(0, level_mod)  # up[0] is the full-resolution level, as in taming
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level_mod in reversed(self.up):
            h = level_mod(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest codebook entry by squared distance (taming's ``VectorQuantizer2``, inference)."""

    def __init__(self, n_embed: int, embed_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """``(B, C, h, w)`` latents -> ``(B, h, w)`` code indices."""
        b, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c)
        table = self.embedding.weight
        dist = flat.pow(2).sum(1, keepdim=True) + table.pow(2).sum(1) - 2 * flat @ table.t()
        return dist.argmin(1).view(b, h, w)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """``(B, h, w)`` code indices -> ``(B, C, h, w)`` codebook vectors."""
        return self.embedding(codes).permute(0, 3, 1, 2).contiguous()


class VQGAN(nn.Module):
    """Meta's ``VQModel`` for inference; ``with_encoder=False`` builds only the decoding half."""

    def __init__(self, cfg: VQGANConfig, with_encoder: bool = True) -> None:
        super().__init__()
        self.config = cfg
        if with_encoder:
            self.encoder = Encoder(cfg)
            self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        self.decoder = Decoder(cfg)

    def latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pre-quantization latents ``(B, embed_dim, H/16, W/16)``."""
        return self.quant_conv(self.encoder(pixels))

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels ``(B, 3, H, W)`` in [-1, 1] -> code indices ``(B, H/16, W/16)``."""
        return self.quantize.codes(self.latents(pixels))

    def decode_latents(self, quant: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(quant))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Code indices ``(B, h, w)`` -> pixels ``(B, 3, 16h, 16w)``, about [-1, 1]."""
        return self.decode_latents(self.quantize.lookup(codes))


def pixels_to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """``(B, 3, H, W)`` decoder output -> ``(B, H, W, 3)`` uint8, as Meta's ``_pil_from_chw_tensor``."""
    x = (pixels.detach().float().cpu().clamp(-1.0, 1.0) + 1.0) / 2.0
    return (x.permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)


def codes_to_pixels(model: VQGAN, codes: np.ndarray) -> np.ndarray:
    """``(h, w)`` or ``(B, h, w)`` code indices -> uint8 RGB ``(…, 16h, 16w, 3)``."""
    batch = torch.as_tensor(np.asarray(codes, dtype=np.int64))
    single = batch.dim() == 2
    param = next(model.decoder.parameters())
    with torch.inference_mode():
        out = pixels_to_uint8(model.decode((batch[None] if single else batch).to(param.device)))
    return out[0] if single else out


# ----------------------------------------------------------------------------------------------
# Files


def load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or of a ``.ckpt``/``.pt`` read with ``weights_only``.

    A Lightning-style ``{"state_dict": {...}}`` is unwrapped. A pickle that needs anything but
    tensors and plain containers (code objects, classes) is refused before anything runs:
    :class:`CheckpointError` says how to convert it once to safetensors.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: unreadable safetensors file: {e}") from None
    import zipfile

    try:  # mmap: a 7B tokenizer's 275 MB checkpoint is not read twice
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()
        reason = next(
            (ln.strip() for ln in first if "GLOBAL" in ln or "Unsupported" in ln), first[0] if first else ""
        )
        raise CheckpointError(
            f"{path}: refused: it needs unpickling of Python objects beyond tensors ({reason[:160]}); "
            f"{CONVERT_HINT}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a torch checkpoint: {str(e).splitlines()[0][:200]}") from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: no state_dict of tensors inside")
    return state


def load_vqgan(config_path: str, weights_path: str, with_encoder: bool = True, device: Any = "cpu") -> VQGAN:
    """Build from ``vqgan.yaml`` and load ``vqgan.ckpt``/``.safetensors`` (eval mode).

    Missing or mis-shaped weights are a :class:`CheckpointError`; keys of other parts (the
    training loss's discriminator and LPIPS, ``loss.*``; the encoder when ``with_encoder`` is
    false) are ignored.
    """
    cfg = VQGANConfig.from_yaml(config_path)
    with torch.device("meta"):
        model = VQGAN(cfg, with_encoder=with_encoder)
    wanted = model.state_dict()
    state = load_state_dict_file(weights_path)
    missing = [k for k in wanted if k not in state]
    wrong = [
        f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
        for k, v in wanted.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or wrong:
        problems = [f"missing {k}" for k in missing[:3]] + wrong[:3]
        raise CheckpointError(
            f"{weights_path}: does not match {config_path}: {'; '.join(problems)}"
            f" ({len(missing)} missing, {len(wrong)} mis-shaped)"
        )
    model.load_state_dict({k: state[k].float() for k in wanted}, assign=True)
    return model.to(device).eval()


def save_vqgan(model: VQGAN, out_dir: str, fmt: str = "ckpt") -> str:
    """Write ``out_dir/vqgan.yaml`` and ``vqgan.ckpt`` (``{"state_dict": ...}``, Meta's layout)
    or ``vqgan.safetensors``; returns ``out_dir``."""
    import yaml

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vqgan.yaml"), "w", encoding="utf-8") as f:
        yaml.safe_dump(model.config.to_yaml_dict(), f, sort_keys=False)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(state, os.path.join(out_dir, "vqgan.safetensors"))
    else:
        torch.save({"state_dict": state}, os.path.join(out_dir, "vqgan.ckpt"))
    return out_dir

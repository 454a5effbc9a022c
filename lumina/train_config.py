"""Typed configuration of the trainer: dataclasses, the CLI that fills them, and the DeepSpeed JSON.

Every setting is a field of one of the section dataclasses below; each field is also a command-line
flag of the same name (``--lr``, ``--micro_batch_size``...), with its help text in the field's
metadata. :func:`parse_args` is the only place an ``argparse.Namespace`` exists. Validation happens
once, in ``__post_init__``, and every error names the flag to change.

The DeepSpeed JSON owns ZeRO, precision and offload; the trainer owns batch sizes, clipping, the
optimizer and the LR schedule. :func:`resolve_deepspeed_config` fills the JSON's ``"auto"`` (or
missing) batch and clipping entries from the flags and refuses a concrete value that disagrees,
so there is one source of truth and a mismatch is an error, not a silent override.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

__all__ = [
    "ConfigError",
    "ModelConfig",
    "LossConfig",
    "OptimConfig",
    "DataSettings",
    "CheckpointConfig",
    "LogConfig",
    "TrainConfig",
    "build_parser",
    "parse_args",
    "config_from_namespace",
    "load_deepspeed_json",
    "resolve_deepspeed_config",
    "SHIPPED_DEEPSPEED_CONFIGS",
    "deepspeed_config_path",
]

# DeepSpeed JSONs shipped inside the package (``lumina/ds_configs/``; the repository's top-level
# ``ds_configs/`` links to them), so the default works from any folder after ``pip install``.
SHIPPED_DEEPSPEED_CONFIGS = ("zero3", "zero3_offload")
DEFAULT_DEEPSPEED_CONFIG = "zero3"


class ConfigError(ValueError):
    """A bad setting; the message names the flag (or DeepSpeed key) to change."""


def _opt(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass
class ModelConfig:
    """Which Chameleon to train and how it is built."""

    init_from: Optional[str] = _opt(
        None, "Hugging Face folder or hub id of a Chameleon checkpoint to start from"
    )
    model_config: Optional[str] = _opt(
        None,
        "config.json (or a folder holding one) to build a randomly initialised Chameleon "
        "instead of --init_from",
    )
    tokenizer: Optional[str] = _opt(
        None,
        "tokenizer folder copied beside exported models (default: --init_from if it holds "
        "one, else the folder beside --model_config named 'tokenizer')",
    )
    vq: str = _opt(
        "freeze",
        "what to do with the VQ image encoder (data is pre-tokenized): "
        "'freeze' keeps it (exported models can still encode images), 'drop' deletes it",
        choices=("freeze", "drop"),
    )
    gradient_checkpointing: bool = _opt(True, "activation checkpointing of every decoder layer")
    residual_dropout: float = _opt(
        0.0,
        "dropout on the attention and MLP branch outputs before "
        "they join the residual stream (reference recipe: 0.05)",
    )
    zero_image_lm_head: bool = _opt(
        False,
        "zero the lm_head rows of image tokens at the start "
        "(the reference starting point); ignored when resuming",
    )
    attn_implementation: str = _opt(
        "sdpa",
        "transformers attention implementation; with --pack: sdpa/eager use a "
        "block-diagonal mask, flash_attention_2/3 the variable-length kernel, flex_attention a "
        "document BlockMask",
        choices=("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"),
    )

    def __post_init__(self) -> None:
        _check(
            (self.init_from is None) != (self.model_config is None),
            "give exactly one of --init_from (a checkpoint) or --model_config (random init)",
        )
        _check(
            0.0 <= self.residual_dropout < 1.0,
            f"--residual_dropout must be in [0, 1), got {self.residual_dropout}",
        )


@dataclass
class LossConfig:
    """The reference loss: token-mean cross-entropy over supervised positions plus z-loss."""

    z_loss_weight: float = _opt(1e-5, "weight of the z-loss mean(logsumexp(logits)^2)")
    mask_image_logits: bool = _opt(
        False,
        "mask image-token logits (transformers' default; only "
        "for text-only supervision: image targets become impossible)",
    )
    loss_chunk_size: int = _opt(
        2048,
        "supervised positions per lm_head/cross-entropy chunk; "
        "bounds the fp32 logits held at once to chunk x vocab",
    )
    loss_norm: str = _opt(
        "global",
        "loss normaliser: 'global' = per supervised token over the whole global batch (all "
        "micro-batches of the step on all ranks; one all-reduce of the counts per step), "
        "'micro' = each micro-batch's token mean, averaged over micro-batches and ranks "
        "(the reference's; a token of a small micro-batch weighs more)",
        choices=("global", "micro"),
    )

    def __post_init__(self) -> None:
        _check(self.z_loss_weight >= 0, f"--z_loss_weight must be >= 0, got {self.z_loss_weight}")
        _check(self.loss_chunk_size > 0, f"--loss_chunk_size must be > 0, got {self.loss_chunk_size}")
        _check(
            self.loss_norm in ("global", "micro"),
            f"--loss_norm must be 'global' or 'micro', got {self.loss_norm!r}",
        )


@dataclass
class OptimConfig:
    """AdamW, warm-up then cosine or constant LR, gradient clipping."""

    lr: float = _opt(2e-5, "peak learning rate")
    min_lr_ratio: float = _opt(0.0, "cosine schedule ends at lr * min_lr_ratio")
    lr_schedule: str = _opt("constant", "LR after warm-up", choices=("constant", "cosine"))
    warmup_steps: int = _opt(0, "linear warm-up steps (optimizer steps)")
    adam_beta1: float = _opt(0.9, "AdamW beta1")
    adam_beta2: float = _opt(0.95, "AdamW beta2")
    adam_eps: float = _opt(1e-8, "AdamW epsilon")
    weight_decay: float = _opt(0.1, "AdamW weight decay (not applied to norms and biases)")
    grad_clip: Optional[float] = _opt(
        None,
        "clip the global gradient norm (default: the DeepSpeed JSON's gradient_clipping "
        "if a number, else 4.0 as in the reference recipe); 0 disables",
    )

    def __post_init__(self) -> None:
        _check(self.lr > 0, f"--lr must be > 0, got {self.lr}")
        _check(0.0 <= self.min_lr_ratio <= 1.0, f"--min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _check(self.warmup_steps >= 0, f"--warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(0.0 <= self.adam_beta1 < 1.0, f"--adam_beta1 must be in [0, 1), got {self.adam_beta1}")
        _check(0.0 <= self.adam_beta2 < 1.0, f"--adam_beta2 must be in [0, 1), got {self.adam_beta2}")
        _check(self.adam_eps > 0, f"--adam_eps must be > 0, got {self.adam_eps}")
        _check(self.weight_decay >= 0, f"--weight_decay must be >= 0, got {self.weight_decay}")
        _check(
            self.grad_clip is None or self.grad_clip >= 0, f"--grad_clip must be >= 0, got {self.grad_clip}"
        )


@dataclass
class DataSettings:
    """Where batches come from and how big they are."""

    data_config: Optional[str] = _opt(None, "data config YAML (datasets and weights)")
    max_seq_len: int = _opt(4096, "truncate samples on the right to this many tokens")
    micro_batch_size: Optional[int] = _opt(
        None,
        "samples per rank per forward (default: the DeepSpeed JSON's "
        "train_micro_batch_size_per_gpu if a number, else 1)",
    )
    grad_accum: Optional[int] = _opt(
        None,
        "micro-batches per optimizer step (default: derived from --global_batch_size, "
        "else the JSON's gradient_accumulation_steps if a number, else 1)",
    )
    global_batch_size: Optional[int] = _opt(
        None, "samples per optimizer step over all ranks = micro_batch_size * grad_accum * world"
    )
    num_workers: int = _opt(2, "data loader worker processes per rank")
    pack: bool = _opt(
        False,
        "pack several samples into each row of up to --max_seq_len tokens "
        "(attention stays inside each sample, positions restart per sample); "
        "--micro_batch_size then counts rows. Needs an unbounded mixture",
    )
    max_tokens: Optional[int] = _opt(
        None,
        "token-budget micro-batches: consecutive samples while rows x longest row stays "
        "within N positions (and --micro_batch_size rows, the row cap), so short samples make "
        "wide micro-batches; samples are cut to min(--max_seq_len, N). Not with --pack; needs "
        "an unbounded mixture (no max_epochs: stop by --max_steps)",
    )
    pad_id: int = _opt(0, "input id used for right padding (labels are -100 there)")
    seed: int = _opt(0, "seed of the data order, the initialisation and dropout")
    cache_dir: Optional[str] = _opt(
        None,
        "cache remote shards whole in this local folder, one per node, shared by its "
        "ranks and workers (overrides the data config's cache:)",
    )
    cache_max_bytes: Optional[str] = _opt(
        None, "size limit of --cache_dir, e.g. 500G (default 64G); least recently used shards are evicted"
    )

    def __post_init__(self) -> None:
        _check(self.max_seq_len > 1, f"--max_seq_len must be > 1, got {self.max_seq_len}")
        for name in ("micro_batch_size", "grad_accum", "global_batch_size"):
            value = getattr(self, name)
            _check(value is None or value > 0, f"--{name} must be > 0, got {value}")
        _check(self.num_workers >= 0, f"--num_workers must be >= 0, got {self.num_workers}")
        _check(
            self.max_tokens is None or self.max_tokens > 0, f"--max_tokens must be > 0, got {self.max_tokens}"
        )
        _check(
            self.max_tokens is None or not self.pack,
            "--max_tokens and --pack true exclude each other (packing already fills rows to "
            "--max_seq_len tokens): drop one",
        )
        _check(self.cache_max_bytes is None or bool(self.cache_dir), "--cache_max_bytes needs --cache_dir")

    def io_options(self) -> Any:
        """The ``wds_tools`` I/O options these settings ask for (the shard cache)."""
        from wds_tools.cli_options import cache_io_options

        return cache_io_options(
            self.cache_dir, self.cache_max_bytes, flags=("--cache_dir", "--cache_max_bytes")
        )


@dataclass
class CheckpointConfig:
    """Output folder, DeepSpeed checkpoints and resume."""

    output_dir: str = _opt("train_out", "folder for checkpoints, logs and the copied tokenizer")
    max_steps: int = _opt(1000, "optimizer steps to train in total (including resumed ones)")
    save_every: int = _opt(
        1000, "save a DeepSpeed checkpoint every N optimizer steps (and at the end); 0 saves only at the end"
    )
    keep_last: int = _opt(3, "keep the last K checkpoints (0 keeps all)")
    stop_after: Optional[int] = _opt(
        None,
        "stop at this global step without the final checkpoint, as if the job were killed "
        "there (periodic checkpoints still happen); for crash/resume drills",
    )
    resume: str = _opt(
        "auto",
        "'auto': continue from the latest checkpoint in "
        "--output_dir/checkpoints if any; 'never': refuse to start over one; "
        "or a checkpoint folder (a step_* tag folder). Another number of processes, "
        "--micro_batch_size or --grad_accum than the checkpoint's is fine (a change of processes "
        "converts it once to DeepSpeed's universal form)",
    )

    def __post_init__(self) -> None:
        _check(self.max_steps > 0, f"--max_steps must be > 0, got {self.max_steps}")
        _check(self.save_every >= 0, f"--save_every must be >= 0, got {self.save_every}")
        _check(self.keep_last >= 0, f"--keep_last must be >= 0, got {self.keep_last}")
        _check(
            self.stop_after is None or self.stop_after > 0, f"--stop_after must be > 0, got {self.stop_after}"
        )


@dataclass
class LogConfig:
    """What is logged and where."""

    log_every: int = _opt(
        10, "reduce and log metrics every N optimizer steps (the only host sync of the loop)"
    )
    tensorboard: bool = _opt(True, "write TensorBoard events to --output_dir/tb when installed")
    peak_tflops: Optional[float] = _opt(
        None,
        "peak dense bf16 TFLOP/s of one accelerator, for the MFU estimate (default: known "
        "GPUs by name: H100/H200 989, A100 312; none on CPU, where MFU is not logged)",
    )
    progress_bar: str = _opt(
        "auto",
        "tqdm progress bar on rank 0: auto (when interactive), always (or true), never (or false)",
        choices=("auto", "always", "never", "true", "false"),
    )

    def __post_init__(self) -> None:
        self.progress_bar = {"true": "always", "false": "never"}.get(self.progress_bar, self.progress_bar)
        _check(self.log_every > 0, f"--log_every must be > 0, got {self.log_every}")
        _check(
            self.peak_tflops is None or self.peak_tflops > 0,
            f"--peak_tflops must be > 0, got {self.peak_tflops}",
        )


@dataclass
class TrainConfig:
    """The whole trainer configuration."""

    model: ModelConfig
    deepspeed_config: str = DEFAULT_DEEPSPEED_CONFIG
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataSettings = field(default_factory=DataSettings)
    ckpt: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return cls(
            deepspeed_config=d["deepspeed_config"],
            **{name: _SECTIONS[name](**d[name]) for name in _SECTIONS},
        )


_SECTIONS = {
    "model": ModelConfig,
    "loss": LossConfig,
    "optim": OptimConfig,
    "data": DataSettings,
    "ckpt": CheckpointConfig,
    "log": LogConfig,
}


def _str2bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _field_type(f: dataclasses.Field) -> type:
    t = str(f.type)
    for name, typ in (("bool", bool), ("int", int), ("float", float)):
        if name in t:
            return typ
    return str


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    """The trainer's CLI: one flag per config field, plus the launchers' ``--local_rank``."""
    parser = parser or argparse.ArgumentParser(
        prog="lumina-train",
        description="Train a Chameleon (Lumina-mGPT) model with DeepSpeed ZeRO-3 on a streamed "
        "WebDataset token mixture.",
    )
    parser.add_argument(
        "--deepspeed_config",
        "--deepspeed-config",
        default=DEFAULT_DEEPSPEED_CONFIG,
        help="DeepSpeed JSON (ZeRO stage, precision, offload): a file, or a config "
        f"shipped with the package ({', '.join(SHIPPED_DEEPSPEED_CONFIGS)}); batch "
        "and clipping entries may be 'auto' and are filled from the flags below "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--local_rank",
        "--local-rank",
        type=int,
        default=None,
        help="set by the deepspeed launcher; ignored (LOCAL_RANK is read instead)",
    )
    for section, cls in _SECTIONS.items():
        group = parser.add_argument_group(section, cls.__doc__)
        for f in dataclasses.fields(cls):
            typ = _field_type(f)
            kw: dict = {"dest": f"{section}.{f.name}", "default": f.default, "help": f.metadata["help"]}
            if typ is bool:
                kw.update(type=_str2bool, nargs="?", const=True, metavar="BOOL")
            else:
                kw.update(type=typ, metavar=f.name.upper())
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
            kw["help"] += " (default: %(default)s)"
            group.add_argument(f"--{f.name}", **kw)
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """Parse the command line into a validated :class:`TrainConfig`."""
    return config_from_namespace(build_parser().parse_args(argv))


def config_from_namespace(args: argparse.Namespace) -> TrainConfig:
    """The validated :class:`TrainConfig` of a namespace :func:`build_parser` produced."""
    ns = vars(args)
    sections: dict = {name: {} for name in _SECTIONS}
    for key, value in ns.items():
        if "." in key:
            section, name = key.split(".", 1)
            sections[section][name] = value
    return TrainConfig(
        deepspeed_config=ns["deepspeed_config"],
        **{name: cls(**sections[name]) for name, cls in _SECTIONS.items()},
    )


def deepspeed_config_path(value: str) -> str:
    """The JSON file ``--deepspeed_config`` names: ``value`` itself when it is a file, else the
    shipped config it names (``zero3``, ``zero3.json`` or ``ds_configs/zero3.json``, from any
    working directory)."""
    if os.path.isfile(value):
        return value
    head, name = os.path.split(os.path.normpath(value))
    stem = name.removesuffix(".json")
    if head in ("", "ds_configs") and stem in SHIPPED_DEEPSPEED_CONFIGS:
        from importlib.resources import files

        return str(files("lumina") / "ds_configs" / f"{stem}.json")
    raise ConfigError(
        f"--deepspeed_config: no such file {value!r} (shipped configs: "
        f"{', '.join(SHIPPED_DEEPSPEED_CONFIGS)})"
    )


def load_deepspeed_json(path: str) -> dict:
    """Read a DeepSpeed JSON config (a file or a shipped name); refuses sections the trainer
    owns."""
    path = deepspeed_config_path(path)
    with open(path) as fh:
        try:
            ds = json.load(fh)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--deepspeed_config {path!r} is not valid JSON: {exc}") from None
    for owned, flags in (
        ("optimizer", "--lr, --adam_beta1/2, --adam_eps, --weight_decay"),
        ("scheduler", "--lr_schedule, --warmup_steps, --min_lr_ratio"),
    ):
        if owned in ds:
            raise ConfigError(
                f"--deepspeed_config {path!r} has an '{owned}' section; the trainer "
                f"owns it: remove it and set {flags}"
            )
    if "fp16" in ds and ds["fp16"].get("enabled", False):
        raise ConfigError(f"--deepspeed_config {path!r}: fp16 is not supported, use bf16")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage != 3:
        raise ConfigError(f"--deepspeed_config {path!r}: zero_optimization.stage must be 3, got {stage}")
    return ds


def _concrete(value: Any) -> bool:
    return value is not None and value != "auto"


def resolve_deepspeed_config(ds: dict, data: DataSettings, optim: OptimConfig, world_size: int) -> dict:
    """Fill the batch, accumulation and clipping entries of ``ds`` and the optimizer section.

    Flags win over the JSON only where the JSON says ``"auto"`` or nothing; a concrete JSON value
    that disagrees with a flag (or with ``micro * accum * world == global``) is a ConfigError.
    Returns a new dict; ``ds`` is left alone.
    """
    out = json.loads(json.dumps(ds))
    j_micro = out.get("train_micro_batch_size_per_gpu")
    j_accum = out.get("gradient_accumulation_steps")
    j_global = out.get("train_batch_size")

    def pick(flag_value, json_value, flag, key):
        if flag_value is not None and _concrete(json_value) and int(json_value) != flag_value:
            raise ConfigError(
                f"--{flag}={flag_value} disagrees with the DeepSpeed JSON's "
                f"{key}={json_value}; set one of them (or make the JSON 'auto')"
            )
        if flag_value is not None:
            return flag_value
        return int(json_value) if _concrete(json_value) else None

    micro = pick(data.micro_batch_size, j_micro, "micro_batch_size", "train_micro_batch_size_per_gpu") or 1
    accum = pick(data.grad_accum, j_accum, "grad_accum", "gradient_accumulation_steps")
    glob = pick(data.global_batch_size, j_global, "global_batch_size", "train_batch_size")
    if accum is None and glob is not None:
        if glob % (micro * world_size):
            raise ConfigError(
                f"--global_batch_size={glob} is not a multiple of --micro_batch_size "
                f"({micro}) x world size ({world_size})"
            )
        accum = glob // (micro * world_size)
    accum = accum or 1
    if glob is None:
        glob = micro * accum * world_size
    if glob != micro * accum * world_size:
        raise ConfigError(
            f"--global_batch_size={glob} != --micro_batch_size ({micro}) x "
            f"--grad_accum ({accum}) x world size ({world_size}) = "
            f"{micro * accum * world_size}"
        )
    out["train_micro_batch_size_per_gpu"] = micro
    out["gradient_accumulation_steps"] = accum
    out["train_batch_size"] = glob

    j_clip = out.get("gradient_clipping")
    if optim.grad_clip is not None and _concrete(j_clip) and float(j_clip) != optim.grad_clip:
        raise ConfigError(
            f"--grad_clip={optim.grad_clip} disagrees with the DeepSpeed JSON's "
            f"gradient_clipping={j_clip}; set one of them (or make the JSON 'auto')"
        )
    clip = optim.grad_clip if optim.grad_clip is not None else (float(j_clip) if _concrete(j_clip) else 4.0)
    out["gradient_clipping"] = clip

    offload = out.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    params = {
        "lr": optim.lr,
        "betas": [optim.adam_beta1, optim.adam_beta2],
        "eps": optim.adam_eps,
        "weight_decay": optim.weight_decay,
    }
    if offload in (None, "none"):
        # torch's AdamW: no JIT-compiled op to build on first use (FusedAdam needs nvcc).
        params["torch_adam"] = True
    out["optimizer"] = {"type": "AdamW", "params": params}
    out.setdefault("steps_per_print", 10**9)
    return out

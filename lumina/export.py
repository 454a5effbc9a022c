"""Export a trainer checkpoint to a Hugging Face folder that ``from_pretrained`` loads.

    python -m lumina.export --run_dir train_out --out hf_model [--tag step_00001000] [--dtype bf16]

Runs on one CPU process, no process group: DeepSpeed's ``zero_to_fp32`` merges the ZeRO-3 shards
into the fp32 master weights, the Chameleon config comes from ``train_out/model``, and the
tokenizer copied at the start of training is copied beside the weights. A VQ encoder dropped for
training (``--vq drop``) is filled from the ``--init_from`` checkpoint when that is a local
folder; otherwise the export says so and leaves it randomly initialised.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import shutil
import sys
from typing import Optional, Sequence

from lumina import checkpoint as ckpt_lib

__all__ = ["add_arguments", "export_checkpoint", "main", "run"]

log = logging.getLogger("lumina.export")

_DTYPES = ("bf16", "fp16", "fp32")
_WRAPPER_PREFIX = "chameleon."


def _vq_from_init(init_from: Optional[str]) -> dict:
    """The ``model.vqmodel.*`` tensors of a local safetensors checkpoint, or {}."""
    if not init_from or not os.path.isdir(init_from):
        return {}
    from safetensors import safe_open

    out = {}
    for path in sorted(glob.glob(os.path.join(init_from, "*.safetensors"))):
        with safe_open(path, framework="pt") as fh:
            for key in fh.keys():
                if key.startswith("model.vqmodel."):
                    out[key] = fh.get_tensor(key)
    return out


def export_checkpoint(output_dir: str, out: str, tag: Optional[str] = None, dtype: str = "bf16") -> str:
    """Write ``out`` (config, safetensors, tokenizer) from checkpoint ``tag`` (default: latest)."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    root = ckpt_lib.checkpoint_root(output_dir)
    tag = tag or ckpt_lib.find_latest(root)
    if tag is None or not os.path.isdir(os.path.join(root, tag)):
        raise ValueError(f"no checkpoint {tag or ''} under {root}")
    if dtype not in _DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    with open(os.path.join(output_dir, "trainer_meta.json")) as fh:
        meta = json.load(fh)
    state = get_fp32_state_dict_from_zero_checkpoint(root, tag=tag)
    state = {k[len(_WRAPPER_PREFIX) :]: v for k, v in state.items() if k.startswith(_WRAPPER_PREFIX)}
    config = ChameleonConfig.from_pretrained(os.path.join(output_dir, "model"))
    model = ChameleonForConditionalGeneration(config)
    missing = set(model.state_dict()) - set(state)
    if missing and all(k.startswith("model.vqmodel.") for k in missing):
        init_from = meta["config"]["model"].get("init_from")
        vq = _vq_from_init(init_from)
        state.update({k: v for k, v in vq.items() if k in missing})
        if missing - set(vq):
            log.warning(
                "the VQ encoder was dropped for training and %s holds no VQ weights: "
                "the export's vqmodel is randomly initialised",
                init_from,
            )
    result = model.load_state_dict(state, strict=False)
    bad = [k for k in result.missing_keys if not k.startswith("model.vqmodel.")]
    if bad or result.unexpected_keys:
        raise ValueError(
            f"checkpoint {tag} does not match the model config: missing {bad[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    model.to(
        {
            "bf16": torch.bfloat16,
            "fp16": torch.float16,  # type: ignore[arg-type]
            "fp32": torch.float32,
        }[dtype]
    )
    model.config.use_cache = True
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    tok_dir = os.path.join(output_dir, "tokenizer")
    if os.path.isdir(tok_dir):
        for name in os.listdir(tok_dir):
            shutil.copy2(os.path.join(tok_dir, name), os.path.join(out, name))
    else:
        log.warning("no tokenizer in %s: the export holds none", output_dir)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The export's flags on ``parser`` (for the ``lumina`` subcommand registry)."""
    parser.add_argument(
        "--run_dir",
        "--output_dir",
        dest="run_dir",
        required=True,
        help="the training run's folder (the trainer's --output_dir)",
    )
    parser.add_argument("--out", required=True, help="folder to write the Hugging Face model to")
    parser.add_argument(
        "--tag", default=None, help="checkpoint tag, e.g. step_00001000 (default: the latest)"
    )
    parser.add_argument(
        "--dtype",
        default="bf16",
        choices=_DTYPES,
        help="dtype of the saved weights (default: %(default)s: the fp32 master "
        "weights rounded as the bf16 engine uses them)",
    )


def run(args: argparse.Namespace) -> int:
    """Export from parsed flags; a bad input exits 2 with one line."""
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        path = export_checkpoint(args.run_dir, args.out, args.tag, args.dtype)
    except (ValueError, FileNotFoundError) as exc:
        print(f"lumina-export: error: {exc}", file=sys.stderr)
        return 2
    print(f"exported to {path}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m lumina.export``: checkpoint -> Hugging Face folder."""
    parser = argparse.ArgumentParser(prog="lumina-export", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

"""Trainer vs a bare ZeRO-3 loop: tokens/s and peak memory on a ~1B-parameter Chameleon shape.

Both sides use the same random-weight model (built from a config under ZeRO-3), the same resolved
DeepSpeed config (ZeRO-3, bf16, torch AdamW, clipping), activation checkpointing, sdpa attention,
and the same random full-length batches of text tokens:

- ``bare``: ``deepspeed.initialize`` + ``model(input_ids, labels=labels).loss`` (transformers'
  forward: full logits, its own cross-entropy) + ``backward`` + ``step``;
- ``trainer``: ``lumina.train.train`` (the real loop: chunked CE + z-loss from hidden states,
  metrics, per-step reseeding), fed by a synthetic loader, no checkpoint written.

Two more sides measure packing on a Lumina-like length mixture (half 60-300-token chat turns,
half 1,024-2,400-token image items; ``lumina.synthetic.MixedLengthLoader``):

- ``padded``: the trainer on right-padded micro-batches of ``--micro_batch_size`` samples;
- ``packed``: the trainer with ``--pack``: ``--micro_batch_size`` rows of ``--seq_len`` tokens
  filled with whole samples, attention per sample through ``--attn`` (sdpa: a block-diagonal
  mask; flex_attention: a document BlockMask; flash_attention_2: the variable-length kernel).

Rows report real tokens/s, samples/s, MFU (``lumina.train.model_flops``: PaLM's
``6 N tokens + 12 L H sum(len^2)``), padding share and peak memory.

Each side runs ``--warmup`` steps, then ``--steps`` timed steps. One GPU, under 4 minutes::

    deepspeed --num_gpus 1 benchmarks/bench_train_gpu.py          # or: torchrun --nproc_per_node 1
    deepspeed --num_gpus 1 benchmarks/bench_train_gpu.py --order padded,packed --attn sdpa
    python benchmarks/bench_train_gpu.py --tiny                    # CPU smoke run, tiny shape
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from lumina.distributed import init_distributed, shutdown_distributed  # noqa: E402
from lumina.synthetic import MixedLengthLoader, SyntheticLoader  # noqa: E402
from lumina.tiny import image_code_token, tiny_vq_config  # noqa: E402
from lumina.train import train  # noqa: E402
from lumina.train_config import (  # noqa: E402
    CheckpointConfig,
    DataSettings,
    LogConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    load_deepspeed_json,
    resolve_deepspeed_config,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHAPES = {
    # ~1.09B parameters: 2 x 65536 x 2048 embeddings/head + 16 x 51.4M layers.
    "1b": dict(
        vocab_size=65536,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=16,
        num_image_tokens=8192,
    ),
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_image_tokens=128,
    ),
}


def write_model_config(out_dir: str, shape: dict, seq_len: int) -> str:
    """A Chameleon config.json with a synthetic vocabulary map (image codes at ids 4..)."""
    from transformers import ChameleonConfig

    shape = dict(shape)
    vocab, num_image = shape.pop("vocab_size"), shape.pop("num_image_tokens")
    vocab_map = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    vocab_map.update({image_code_token(i): 4 + i for i in range(num_image)})
    vocab_map.update({f"<tok{i}>": i for i in range(4 + num_image, vocab)})
    config = ChameleonConfig(
        vocab_size=vocab,
        vocabulary_map=vocab_map,
        vq_config=tiny_vq_config(num_image),
        max_position_embeddings=max(4096, seq_len),
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
        **shape,
    )
    config.save_pretrained(out_dir)
    return out_dir


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _reset_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib():
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def _config(args, model_dir: str, out_dir: str, pack: bool = False) -> TrainConfig:
    n = args.warmup + args.steps
    return TrainConfig(
        model=ModelConfig(
            model_config=model_dir,
            vq="freeze",
            gradient_checkpointing=True,
            attn_implementation=args.attn if pack else "sdpa",
        ),
        deepspeed_config="zero3",
        loss=LossConfig(),
        optim=OptimConfig(lr=1e-4, warmup_steps=0),
        data=DataSettings(
            micro_batch_size=args.micro_batch_size,
            grad_accum=1,
            max_seq_len=args.seq_len,
            num_workers=0,
            seed=0,
            pack=pack,
        ),
        # stop_after < max_steps: no checkpoint (a 1B ZeRO-3 checkpoint is ~17 GB of writes).
        ckpt=CheckpointConfig(output_dir=out_dir, max_steps=n + 1, stop_after=n, save_every=0),
        log=LogConfig(
            log_every=args.warmup if args.warmup == args.steps else n, tensorboard=False, progress_bar="never"
        ),
    )


def _loader(args, vocab: int):
    def factory(cfg, rank, world, micro):
        return SyntheticLoader(
            vocab,
            micro,
            args.seq_len,
            rank=rank,
            seed=0,
            min_len=args.seq_len,
            prompt_len=1,
            min_token=args.min_token,
        )

    return factory


def run_bare(args, cfg: TrainConfig, dist, vocab: int) -> dict:
    """deepspeed.initialize on transformers' Chameleon, its own forward and loss."""
    import deepspeed
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration
    from transformers.integrations.deepspeed import HfDeepSpeedConfig

    ds = resolve_deepspeed_config(
        load_deepspeed_json(cfg.deepspeed_config), cfg.data, cfg.optim, dist.world_size
    )
    handle = HfDeepSpeedConfig(ds)  # kept alive while the model is built
    torch.manual_seed(0)
    model = ChameleonForConditionalGeneration._from_config(
        ChameleonConfig.from_pretrained(cfg.model.model_config),
        dtype=torch.bfloat16,
        attn_implementation="sdpa",
    )
    model.config.use_cache = False
    model.model.vqmodel.requires_grad_(False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds
    )
    del handle
    source = SyntheticLoader(
        vocab,
        args.micro_batch_size,
        args.seq_len,
        seed=0,
        min_len=args.seq_len,
        prompt_len=1,
        min_token=args.min_token,
    )
    engine.train()
    t0 = None
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            _sync()
            t0 = time.perf_counter()
        batch = source.batch(i)
        out = engine(
            input_ids=batch["input_ids"].to(dist.device),
            labels=batch["labels"].to(dist.device),
            use_cache=False,
        )
        engine.backward(out.loss)
        engine.step()
    _sync()
    elapsed = time.perf_counter() - t0
    tokens = args.steps * args.micro_batch_size * args.seq_len
    result = {
        "name": "bare ZeRO-3 loop (HF forward + loss)",
        "tokens_per_s": tokens / elapsed,
        "step_s": elapsed / args.steps,
        "peak_gib": _peak_gib(),
        "last_loss": float(out.loss.detach()),
    }
    if hasattr(engine, "destroy"):
        engine.destroy()
    del engine, model, out
    return result


def _result(name: str, args, timed: dict) -> dict:
    return {
        "name": name,
        "tokens_per_s": timed["tokens_per_s"],
        "samples_per_s": timed.get("samples_per_s"),
        "mfu": timed.get("mfu"),
        "padding_share": timed.get("padding_share"),
        "step_s": timed["time_s"] / args.steps,
        "peak_gib": _peak_gib(),
        "last_loss": timed["loss"],
        "data_wait_share": timed["data_wait_share"],
    }


def run_trainer(args, cfg: TrainConfig, vocab: int) -> dict:
    records = train(cfg, loader_factory=_loader(args, vocab))
    return _result("lumina trainer (chunked CE + z-loss)", args, records[-1])


def run_mixed(args, cfg: TrainConfig, vocab: int, pack: bool) -> dict:
    """The trainer on the short/long length mixture, padded or packed."""

    def factory(cfg, rank, world, micro):
        return MixedLengthLoader(
            vocab,
            micro,
            args.seq_len,
            pack=pack,
            rank=rank,
            seed=0,
            short_len=args.short_len,
            long_len=args.long_len,
            min_token=args.min_token,
        )

    records = train(cfg, loader_factory=factory)
    name = f"packed ({args.attn})" if pack else "padded"
    return _result(f"{name}, length mix", args, records[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shape, short sequences (CPU)")
    parser.add_argument("--seq_len", type=int, default=None, help="default 4096 (tiny: 64)")
    parser.add_argument("--micro_batch_size", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per side")
    parser.add_argument(
        "--steps",
        type=int,
        default=5,
        help="timed steps per side (keep equal to --warmup: the trainer's timed window is one log window)",
    )
    parser.add_argument(
        "--order", default="bare,trainer", help="sides in order: bare, trainer, padded, packed"
    )
    parser.add_argument(
        "--attn",
        default="sdpa",
        choices=("sdpa", "eager", "flex_attention", "flash_attention_2"),
        help="attention of the packed side",
    )
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    args = parser.parse_args(argv)
    args.seq_len = args.seq_len or (64 if args.tiny else 4096)
    scale = args.seq_len / 4096  # the length mix, scaled to the sequence length
    args.short_len = (max(2, int(60 * scale)), max(3, int(300 * scale)))
    args.long_len = (max(4, int(1024 * scale)), max(5, int(2400 * scale)))
    if args.steps != args.warmup:
        parser.error("--steps must equal --warmup (one log window each)")
    shape = SHAPES["tiny" if args.tiny else "1b"]
    # Text tokens only: transformers' forward (the bare side) masks image-token logits, so an
    # image-token target would give it an infinite loss.
    args.min_token = 4 + shape["num_image_tokens"]
    dist = init_distributed()
    tmp = tempfile.mkdtemp(prefix="bench_train_gpu_")
    model_dir = write_model_config(os.path.join(tmp, "model"), shape, args.seq_len)
    cfg = _config(args, model_dir, os.path.join(tmp, "run"))
    n_params = None
    results = []
    for side in args.order.split(","):
        _reset_memory()
        if side == "bare":
            results.append(run_bare(args, cfg, dist, shape["vocab_size"]))
        elif side == "trainer":
            results.append(run_trainer(args, cfg, shape["vocab_size"]))
        elif side in ("padded", "packed"):
            pack = side == "packed"
            results.append(
                run_mixed(
                    args,
                    _config(args, model_dir, os.path.join(tmp, f"run_{side}"), pack=pack),
                    shape["vocab_size"],
                    pack,
                )
            )
        else:
            parser.error(f"--order: unknown side {side!r}")
    if n_params is None:
        from transformers import ChameleonConfig, ChameleonForConditionalGeneration

        with torch.device("meta"):
            m = ChameleonForConditionalGeneration(ChameleonConfig.from_pretrained(model_dir))
        n_params = sum(p.numel() for n, p in m.named_parameters() if "vqmodel" not in n)
    if dist.rank == 0:
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        print(
            f"\nChameleon {n_params / 1e9:.2f}B params (VQ excluded), seq {args.seq_len}, "
            f"micro-batch {args.micro_batch_size}, bf16, ZeRO-3, activation checkpointing, "
            f"{dist.world_size} x {device}; {args.steps} timed steps after {args.warmup}\n"
        )
        print("| loop | tokens/s | samples/s | MFU | padding | step (s) | peak memory (GiB) | last loss |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in results:
            peak = "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
            mfu = "n/a" if r.get("mfu") is None else f"{r['mfu']:.1%}"
            sps = "n/a" if r.get("samples_per_s") is None else f"{r['samples_per_s']:,.1f}"
            pad = "n/a" if r.get("padding_share") is None else f"{r['padding_share']:.1%}"
            print(
                f"| {r['name']} | {r['tokens_per_s']:,.0f} | {sps} | {mfu} | {pad} | "
                f"{r['step_s']:.3f} | {peak} | {r['last_loss']:.3f} |"
            )
        by = {r["name"].split()[0]: r for r in results}
        if "bare" in by and "lumina" in by:
            ratio = by["lumina"]["tokens_per_s"] / by["bare"]["tokens_per_s"]
            print(f"\ntrainer / bare tokens/s = {ratio:.3f} (target >= 0.97)")
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(
                    {"device": device, "params": n_params, "args": vars(args), "results": results},
                    fh,
                    indent=2,
                )
    shutdown_distributed(exit_code=0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

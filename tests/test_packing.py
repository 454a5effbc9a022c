"""Packed training is exact: a packed batch gives the loss and gradients of the same samples
padded, for every attention implementation (CPU: eager, sdpa; GPU: the variable-length paths).

Tolerance (fp32 tiny Chameleon): loss within 1e-5 relative, every parameter's gradient within
``atol=1e-5 + rtol=1e-4`` of the padded run's (observed differences are ~1e-7: only the order of
floating-point sums changes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from lumina.packing import block_causal_mask, model_inputs, sample_lengths, varlen_available

LENGTHS = [7, 13, 5, 20, 9, 11, 3, 16]
MAX_SEQ_LEN = 32


def _samples(vocab: int, seed: int = 0):
    """Token ids and supervised spans of samples of ``LENGTHS`` (prompt first, answer trained)."""
    rng = np.random.default_rng(seed)
    ids = [rng.integers(5, vocab, n).astype(np.uint16) for n in LENGTHS]
    spans = [[(max(1, n // 3), n)] for n in LENGTHS]
    spans[3] = [(0, 4), (8, 20)]  # two spans, one from the first token
    return ids, spans


def _batches(vocab: int):
    from wds_tools.collate import PACK_FIELDS, PAD_FIELDS, pack_batch, pad_batch, rows_for_packing

    ids, spans = _samples(vocab)
    padded, _ = pad_batch(ids, spans, MAX_SEQ_LEN)
    rows = rows_for_packing(LENGTHS, MAX_SEQ_LEN, num_rows=len(LENGTHS))
    assert sum(map(len, rows)) == len(LENGTHS) and len(rows) < len(LENGTHS)
    packed, counts = pack_batch(ids, spans, rows, MAX_SEQ_LEN)
    as_dict = lambda arr, fields: {f: torch.from_numpy(arr[k]) for k, f in enumerate(fields)}  # noqa: E731
    return as_dict(padded, PAD_FIELDS), as_dict(packed, PACK_FIELDS), counts


def _model(model_dir: str, impl: str):
    from lumina.model import build_model
    from lumina.train_config import LossConfig, ModelConfig

    torch.manual_seed(0)
    model, _ = build_model(
        ModelConfig(init_from=model_dir, attn_implementation=impl, gradient_checkpointing=False),
        LossConfig(z_loss_weight=1e-4),
        ds_config=None,
    )
    return model.train()


def _loss_and_grads(model, batch, impl: str, device=None):
    model.zero_grad(set_to_none=True)
    out = model(**model_inputs(batch, impl, torch.float32, device))
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def _assert_same(model, padded, packed, impl, device=None):
    a, ga = _loss_and_grads(model, padded, impl, device)
    b, gb = _loss_and_grads(model, packed, impl, device)
    assert a.num_tokens == b.num_tokens > 0
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(b.ce_sum, a.ce_sum, rtol=1e-5, atol=0)
    assert ga.keys() == gb.keys() and len(ga) > 5
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.fixture(scope="module")
def tiny_model_dir():
    from lumina_fixtures import build_tiny_dirs

    return build_tiny_dirs()[1]


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_packed_batch_equals_padded_batch_loss_and_gradients(tiny_model_dir, impl):
    model = _model(tiny_model_dir, impl)
    vocab = model.chameleon.config.vocab_size
    padded, packed, counts = _batches(vocab)
    assert counts["padding"] < padded["input_ids"].numel() - sum(LENGTHS)
    _assert_same(model, padded, packed, impl)


def test_packing_without_the_mask_would_leak_across_samples(tiny_model_dir):
    """The check above can fail: packed rows under a plain causal mask give another loss."""
    model = _model(tiny_model_dir, "sdpa")
    padded, packed, _ = _batches(model.chameleon.config.vocab_size)
    a, _ = _loss_and_grads(model, padded, "sdpa")
    leaky = {k: v for k, v in packed.items() if k != "segment_ids"}
    leaky["attention_mask"] = torch.ones_like(leaky["attention_mask"])
    b = model(**model_inputs(leaky, "sdpa", torch.float32))
    # 20x the tolerance of the exactness test (a random tiny model predicts almost uniformly,
    # so a leak moves the loss little, but far beyond float noise)
    assert (b.loss - a.loss).abs() > 2e-4 * a.loss.abs()


def test_labels_never_cross_a_sample_boundary():
    """In a packed row the first token of every sample is not a target, so the shifted loss never
    predicts it from the previous sample's last token; padding is never a target."""
    _, packed, _ = _batches(300)
    seg, lab = packed["segment_ids"], packed["labels"]
    starts = torch.zeros_like(seg, dtype=torch.bool)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    starts[:, 0] = True
    assert (lab[starts] == -100).all()
    assert (lab[seg == 0] == -100).all()
    assert (packed["position_ids"][starts & (seg > 0)] == 0).all()


def test_block_causal_mask_and_sample_lengths():
    seg = torch.tensor([[1, 1, 2, 2, 2, 0]])
    m = block_causal_mask(seg)[0, 0]
    assert m.tolist()[3] == [False, False, True, True, False, False]
    assert m.tolist()[5] == [False] * 5 + [True]  # padding attends to padding only
    add = block_causal_mask(seg, torch.float32)[0, 0]
    assert add[3, 2] == 0 and add[3, 1] == torch.finfo(torch.float32).min
    assert sample_lengths(seg != 0, seg) == [2, 3]
    assert sample_lengths(torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])) == [3, 2]


def test_packed_paths_this_machine_cannot_run_are_refused_in_one_line():
    from lumina.packing import check_packed_path

    check_packed_path("sdpa")
    check_packed_path("eager")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--attn_implementation flex_attention needs CUDA"):
            check_packed_path("flex_attention")
        with pytest.raises(ValueError, match="needs CUDA and the flash-attn package"):
            check_packed_path("flash_attention_2")


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["sdpa", "flex_attention", "flash_attention_2"])
def test_packed_batch_equals_padded_batch_on_gpu(tiny_model_dir, impl):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if impl != "sdpa" and not varlen_available(impl):
        pytest.skip(f"{impl} is not available on this machine")
    model = _model(tiny_model_dir, impl).cuda()
    padded, packed, _ = _batches(model.chameleon.config.vocab_size)
    # flash-attention runs in half precision only: compare in bf16 with a looser tolerance
    if impl.startswith("flash"):
        model = model.to(torch.bfloat16)
        a, ga = _loss_and_grads(model, padded, "sdpa", torch.device("cuda"))
        b, gb = _loss_and_grads(model, packed, impl, torch.device("cuda"))
        torch.testing.assert_close(b.loss, a.loss, rtol=2e-2, atol=0)
        return
    _assert_same(model, padded, packed, impl, torch.device("cuda"))


# ----------------------------------------------------------------------------------------------
# Metrics: samples/s and the FLOP count come from the CPU batch


def test_meter_counts_samples_and_lengths_of_packed_and_padded_batches():
    from lumina.train import _Meter, model_flops

    padded, packed, _ = _batches(300)
    names = [f"d{i % 2}" for i in range(len(LENGTHS))]
    for batch in (padded, packed):
        meter = _Meter(torch.device("cpu"))
        meter.add_batch(dict(batch, dataset=names), wait_s=0.0)
        assert meter.host["samples"] == len(LENGTHS)
        assert meter.host["real_tokens"] == sum(LENGTHS)
        assert meter.host["len_sq"] == sum(n * n for n in LENGTHS)
        assert meter.host["slot_tokens"] == batch["input_ids"].numel()
        assert meter.tokens == {"d0": sum(LENGTHS[0::2]), "d1": sum(LENGTHS[1::2])}
    # 6 N D plus 12 L H sum(len^2) (PaLM), per forward + backward
    assert model_flops(1000, 2, 8, 10, 50) == 6 * 1000 * 10 + 12 * 2 * 8 * 50


# ----------------------------------------------------------------------------------------------
# A packed training run of the demo data against the same samples unpacked (slow)

RUNNER = '''
"""``runner.py packed|unpacked FLAGS...``: ``lumina.train`` in one process on a packed loader;
``unpacked`` turns every packed batch into a right-padded one of the same samples (same order,
same micro-batches), so the two loss curves must agree."""
import sys

import torch

from lumina.distributed import shutdown_distributed
from lumina.train import train, wds_loader_factory
from lumina.train_config import parse_args


def unpack(batch):
    seg, ids, labels = batch["segment_ids"], [], []
    for r in range(seg.shape[0]):
        for s in range(1, int(seg[r].max()) + 1):
            keep = seg[r] == s
            ids.append(batch["input_ids"][r][keep])
            labels.append(batch["labels"][r][keep])
    n, t = len(ids), max(len(x) for x in ids)
    out = {"input_ids": torch.zeros(n, t, dtype=torch.long),
           "labels": torch.full((n, t), -100, dtype=torch.long),
           "attention_mask": torch.zeros(n, t, dtype=torch.long),
           "dataset": batch["dataset"], "__key__": batch["__key__"]}
    for i, (x, y) in enumerate(zip(ids, labels)):
        out["input_ids"][i, :len(x)], out["labels"][i, :len(x)] = x, y
        out["attention_mask"][i, :len(x)] = 1
    return out


class Unpacked:
    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        return (unpack(b) for b in self.loader)

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, sd):
        self.loader.load_state_dict(sd)

    def gather_state_dicts(self):
        return self.loader.gather_state_dicts()


mode, argv = sys.argv[1], sys.argv[2:]
factory = None
if mode == "unpacked":
    factory = lambda cfg, rank, world, micro: Unpacked(wds_loader_factory(cfg, rank, world, micro))
train(parse_args(argv), loader_factory=factory)
shutdown_distributed(exit_code=0)
'''

PACKED_STEPS = 8
# fp32 (ZeRO-3 without bf16), so the comparison shows the packing, not bf16 rounding.
LOSS_RTOL = 1e-5  # observed: 1.5e-7


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    """The demo's data (scripts/demo.sh steps 1-2, one pre-tokenizer rank): the bundled photos
    and captions as two datasets, mixed 70/30, and the tiny Chameleon."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    base = tmp_path_factory.mktemp("packed_demo")
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        NPROC="1",
        PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    assets = os.path.join(root, "lumina", "assets", "demo")

    def run(cmd, **kw):
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root, **kw)
        assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"

    run([sys.executable, "-m", "lumina.cli", "make-tiny", "--out", str(base / "tiny")], env=env)
    for name in ("captions", "vqa"):
        run(
            [
                "bash",
                os.path.join(root, "scripts", "pre_tokenize.sh"),
                "--in_filename",
                os.path.join(assets, f"{name}.json"),
                "--out_dir",
                str(base / "data" / name),
                "--target_size",
                "256",
                "--image_root",
                assets,
                "--tokenizer",
                str(base / "tiny" / "tokenizer"),
                "--vq_model",
                str(base / "tiny" / "model"),
                "--batch_size",
                "4",
                "--max_samples_per_shard",
                "4",
                "--crop",
                "center",
            ],
            env=dict(env, PYTHON=sys.executable),
        )
    (base / "data.yaml").write_text(
        textwrap.dedent("""\
        seed: 0
        weight_by: samples
        datasets:
          - {name: captions, manifest: data/captions/index.json, weight: 0.7}
          - {name: vqa, manifest: data/vqa/index.json, weight: 0.3}
        """)
    )
    ds = json.loads(open(os.path.join(root, "lumina", "ds_configs", "zero3.json")).read())
    ds["bf16"] = {"enabled": False}
    (base / "zero3_fp32.json").write_text(json.dumps(ds))
    (base / "runner.py").write_text(RUNNER)
    return {"base": base, "root": root, "env": env}


def _packed_run(demo, mode: str) -> dict:
    base, out = demo["base"], demo["base"] / mode
    cmd = [
        sys.executable,
        str(base / "runner.py"),
        mode,
        "--pack",
        "true",
        "--data_config",
        str(base / "data.yaml"),
        "--init_from",
        str(base / "tiny" / "model"),
        "--deepspeed_config",
        str(base / "zero3_fp32.json"),
        "--output_dir",
        str(out),
        "--max_seq_len",
        "1024",
        "--micro_batch_size",
        "2",
        "--grad_accum",
        "1",
        "--lr",
        "3e-3",
        "--warmup_steps",
        "2",
        "--max_steps",
        str(PACKED_STEPS + 1),
        "--stop_after",
        str(PACKED_STEPS),
        "--save_every",
        "0",
        "--log_every",
        "1",
        "--num_workers",
        "0",
        "--progress_bar",
        "never",
        "--tensorboard",
        "false",
    ]
    env = dict(
        demo["env"],
        TORCH_EXTENSIONS_DIR=os.environ.get(
            "TORCH_EXTENSIONS_DIR", os.path.join(demo["root"], ".cache", "torch_extensions")
        ),
    )
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=demo["root"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    with open(out / "metrics.jsonl") as fh:
        return {r["step"]: r for r in map(json.loads, fh)}


@pytest.mark.slow
def test_packed_run_of_the_demo_data_follows_the_unpacked_loss_curve(demo_data):
    packed, unpacked = _packed_run(demo_data, "packed"), _packed_run(demo_data, "unpacked")
    steps = list(range(1, PACKED_STEPS + 1))
    assert sorted(packed) == sorted(unpacked) == steps
    for s in steps:  # same samples, same order, same micro-batches
        assert packed[s]["dataset_samples"] == unpacked[s]["dataset_samples"]
        assert packed[s]["supervised_tokens"] == unpacked[s]["supervised_tokens"]
        assert packed[s]["loss"] == pytest.approx(unpacked[s]["loss"], rel=LOSS_RTOL), s
    assert packed[steps[-1]]["loss"] < packed[1]["loss"]  # it learns
    pad = sum(packed[s]["padding_share"] for s in steps) / len(steps)
    pad_unpacked = sum(unpacked[s]["padding_share"] for s in steps) / len(steps)
    samples = sum(packed[steps[-1]]["dataset_samples"].values())
    print(
        f"\npacked pad {pad:.2%}, unpacked pad {pad_unpacked:.2%} (same {samples} samples), "
        f"max loss rel diff {max(abs(packed[s]['loss'] / unpacked[s]['loss'] - 1) for s in steps):.2e}"
    )
    assert pad < 0.05 < pad_unpacked
    last = packed[steps[-1]]
    assert last["samples_per_s"] > 0 and last["model_tflops_per_s"] > 0
    assert last["mfu"] is None  # CPU: no peak to divide by

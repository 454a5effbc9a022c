"""The trainer's typed config, its CLI, the shipped DeepSpeed JSONs and the batch arithmetic."""

import json
import os
import subprocess
import sys

import pytest

from lumina.train import lr_lambda
from lumina.train_config import (
    ConfigError,
    DataSettings,
    OptimConfig,
    build_parser,
    load_deepspeed_json,
    parse_args,
    resolve_deepspeed_config,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DS_DIR = os.path.join(ROOT, "ds_configs")


@pytest.mark.parametrize("name,offload", [("zero3.json", False), ("zero3_offload.json", True)])
def test_shipped_deepspeed_configs_load_and_resolve(name, offload):
    ds = load_deepspeed_json(os.path.join(DS_DIR, name))
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"]
    # save_16bit_model writes nothing without this flag.
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
    out = resolve_deepspeed_config(
        ds,
        DataSettings(micro_batch_size=4, grad_accum=2),
        OptimConfig(lr=3e-4, weight_decay=0.05),
        world_size=8,
    )
    assert out["train_micro_batch_size_per_gpu"] == 4
    assert out["gradient_accumulation_steps"] == 2
    assert out["train_batch_size"] == 64
    assert out["gradient_clipping"] == 4.0
    params = out["optimizer"]["params"]
    assert out["optimizer"]["type"] == "AdamW" and params["lr"] == 3e-4
    assert params["betas"] == [0.9, 0.95] and params["weight_decay"] == 0.05
    # Offload uses DeepSpeed's CPU Adam; otherwise torch's AdamW (no JIT-built op).
    assert params.get("torch_adam", False) is (not offload)


def test_global_batch_derives_accumulation():
    out = resolve_deepspeed_config(
        {"zero_optimization": {"stage": 3}},
        DataSettings(micro_batch_size=2, global_batch_size=16),
        OptimConfig(),
        world_size=2,
    )
    assert out["gradient_accumulation_steps"] == 4


@pytest.mark.parametrize(
    "data,ds,world,flag",
    [
        (DataSettings(micro_batch_size=2, grad_accum=2, global_batch_size=10), {}, 2, "--global_batch_size"),
        (DataSettings(micro_batch_size=3, global_batch_size=16), {}, 2, "--global_batch_size"),
        (DataSettings(micro_batch_size=2), {"train_micro_batch_size_per_gpu": 4}, 1, "--micro_batch_size"),
        (DataSettings(grad_accum=2), {"gradient_accumulation_steps": 3}, 1, "--grad_accum"),
        (DataSettings(micro_batch_size=1, grad_accum=1), {"train_batch_size": 5}, 2, "--global_batch_size"),
    ],
)
def test_batch_mismatch_is_an_error_naming_the_flag(data, ds, world, flag):
    ds = {"zero_optimization": {"stage": 3}, **ds}
    with pytest.raises(ConfigError, match=flag):
        resolve_deepspeed_config(ds, data, OptimConfig(), world_size=world)


def test_concrete_json_values_are_used_when_flags_are_absent():
    ds = {
        "zero_optimization": {"stage": 3},
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 2,
        "gradient_clipping": 1.0,
    }
    out = resolve_deepspeed_config(ds, DataSettings(), OptimConfig(), world_size=2)
    assert (out["train_batch_size"], out["gradient_clipping"]) == (16, 1.0)
    with pytest.raises(ConfigError, match="--grad_clip"):
        resolve_deepspeed_config(ds, DataSettings(), OptimConfig(grad_clip=2.0), world_size=2)


@pytest.mark.parametrize(
    "section,match",
    [
        ({"optimizer": {"type": "Adam"}}, "--lr"),
        ({"scheduler": {"type": "WarmupLR"}}, "--lr_schedule"),
        ({"fp16": {"enabled": True}}, "bf16"),
        ({"zero_optimization": {"stage": 2}}, "stage must be 3"),
    ],
)
def test_deepspeed_json_sections_owned_by_the_trainer_are_refused(tmp_path, section, match):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}, **section}))
    with pytest.raises(ConfigError, match=match):
        load_deepspeed_json(str(path))


@pytest.mark.parametrize(
    "argv,flag",
    [
        (["--model_config", "x", "--lr", "-1"], "--lr"),
        (["--model_config", "x", "--max_steps", "0"], "--max_steps"),
        (["--model_config", "x", "--micro_batch_size", "0"], "--micro_batch_size"),
        (["--model_config", "x", "--residual_dropout", "1.5"], "--residual_dropout"),
        (["--model_config", "x", "--init_from", "y"], "--init_from"),
        ([], "--init_from"),
    ],
)
def test_validation_errors_name_the_flag(argv, flag):
    with pytest.raises(ConfigError, match=flag):
        parse_args(argv)


def test_parse_args_fills_sections_and_accepts_launcher_flags():
    cfg = parse_args(
        [
            "--init_from",
            "m",
            "--local_rank=3",
            "--gradient_checkpointing",
            "false",
            "--zero_image_lm_head",
            "--z_loss_weight",
            "0",
            "--lr_schedule",
            "cosine",
        ]
    )
    assert cfg.model.init_from == "m" and cfg.model.gradient_checkpointing is False
    assert cfg.model.zero_image_lm_head is True and cfg.loss.z_loss_weight == 0.0
    assert cfg.optim.lr_schedule == "cosine"
    assert type(cfg).from_dict(cfg.to_dict()) == cfg


def test_lr_schedule_warmup_then_cosine_or_constant():
    cfg = parse_args(
        [
            "--init_from",
            "m",
            "--warmup_steps",
            "4",
            "--max_steps",
            "14",
            "--lr_schedule",
            "cosine",
            "--min_lr_ratio",
            "0.1",
        ]
    )
    fn = lr_lambda(cfg)
    assert [fn(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert fn(4) == pytest.approx(1.0) and fn(9) == pytest.approx(0.55) and fn(14) == pytest.approx(0.1)
    cfg.optim.lr_schedule = "constant"
    assert lr_lambda(cfg)(100) == 1.0


def test_cli_help_lists_every_flag():
    out = subprocess.run(
        [sys.executable, "-m", "lumina.train", "--help"], capture_output=True, text=True, cwd=ROOT, check=True
    ).stdout
    for action in build_parser()._actions:
        for opt in action.option_strings:
            assert opt in out
    assert "--deepspeed_config" in out and "--z_loss_weight" in out


def test_cli_bad_flag_is_one_line_exit_2():
    proc = subprocess.run(
        [sys.executable, "-m", "lumina.train", "--init_from", "m", "--lr", "0"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "lumina-train: error: --lr must be > 0, got 0.0"


def test_export_without_checkpoint_is_one_line_error(tmp_path, capsys):
    from lumina.export import main as export_main

    assert export_main(["--output_dir", str(tmp_path), "--out", str(tmp_path / "hf")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_resume_resolution(tmp_path):
    from lumina.checkpoint import prune_checkpoints, resolve_resume

    assert resolve_resume("auto", str(tmp_path)) is None
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        (root / f"step_{step:08d}").mkdir(parents=True)
        (root / f"step_{step:08d}" / "x.pt").write_text("x")
    (root / "latest").write_text("step_00000004")  # DeepSpeed's pointer wins
    assert resolve_resume("auto", str(tmp_path)) == (str(root), "step_00000004")
    assert resolve_resume(str(root / "step_00000002"), str(tmp_path)) == (str(root), "step_00000002")
    with pytest.raises(ConfigError, match="--resume never"):
        resolve_resume("never", str(tmp_path))
    with pytest.raises(ConfigError, match="--resume"):
        resolve_resume(str(tmp_path / "nope"), str(tmp_path))
    assert prune_checkpoints(str(root), 1) == ["step_00000002", "step_00000004"]
    assert sorted(os.listdir(root)) == ["latest", "step_00000006"]


def test_default_deepspeed_config_resolves_from_any_folder(tmp_path):
    """The default (and ``ds_configs/NAME.json``) name the configs shipped inside the package, so
    a run started from another folder (or after ``pip install``) finds them."""
    code = (
        "from lumina.train_config import load_deepspeed_json, parse_args; "
        "cfg = parse_args(['--init_from', 'm']); "
        "a = load_deepspeed_json(cfg.deepspeed_config); "
        "b = load_deepspeed_json('ds_configs/zero3_offload.json'); "
        "print(cfg.deepspeed_config, a['zero_optimization']['stage'], "
        "b['zero_optimization']['offload_optimizer']['device'])"
    )
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env, check=True
    ).stdout
    assert out.split() == ["zero3", "3", "cpu"]
    with pytest.raises(ConfigError, match=r"no such file 'nope\.json' \(shipped configs: zero3, "):
        load_deepspeed_json("nope.json")


def test_shipped_deepspeed_configs_have_one_copy():
    """``lumina/ds_configs/`` holds the JSONs (package data); the top-level folder links to them."""
    from lumina.train_config import SHIPPED_DEEPSPEED_CONFIGS

    for name in SHIPPED_DEEPSPEED_CONFIGS:
        top = os.path.join(DS_DIR, f"{name}.json")
        shipped = os.path.join(ROOT, "lumina", "ds_configs", f"{name}.json")
        assert os.path.isfile(shipped) and not os.path.islink(shipped)
        assert os.path.islink(top) and os.path.samefile(top, shipped)


def test_checkpoint_of_another_trainer_version_is_a_one_line_error():
    from lumina.checkpoint import CLIENT_STATE_VERSION, check_client_state, client_state

    state = client_state(4, [{}, {}], {}, world_size=2)
    assert check_client_state(state, "run/checkpoints/step_00000004", 2) is state
    state["version"] = CLIENT_STATE_VERSION + 1
    with pytest.raises(ConfigError) as err:
        check_client_state(state, "run/checkpoints/step_00000004", 2)
    msg = str(err.value)
    assert "\n" not in msg and "run/checkpoints/step_00000004" in msg
    assert f"version {CLIENT_STATE_VERSION + 1}" in msg and f"version {CLIENT_STATE_VERSION}" in msg
    state["version"] = CLIENT_STATE_VERSION
    with pytest.raises(ConfigError, match="written by 2 ranks, this run has 4"):
        check_client_state(state, "run/checkpoints/step_00000004", 4)

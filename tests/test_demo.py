"""The README's first command: scripts/demo.sh runs end to end (tokenize, inspect, mix, train with
ZeRO-3 on 2 CPU processes, kill, resume, export) and its loss goes down."""

import json
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = dict(
        os.environ,
        DEMO_OUT=str(out),
        DEMO_SKIP_SETUP="1",
        DEMO_STEPS="20",
        DEMO_KILL_AT="10",
        DEMO_PORT=str(_free_port()),
        PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
    )
    p = subprocess.run(
        ["bash", os.path.join(ROOT, "scripts", "demo.sh")],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "ok: " in p.stdout and "samples verified" in p.stdout  # verify passed
    assert "killed the run" in p.stdout and "resumed from" in p.stdout  # kill + auto-resume
    assert "step_00000010" in p.stdout.split("resumed from", 1)[1].splitlines()[0]
    rows = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert steps[-1] == 20 and len(set(steps)) == len(steps)  # no step logged twice
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5  # it learns
    assert (out / "export" / "config.json").exists()
    assert sorted(os.listdir(out / "data")) == ["captions", "vqa"]

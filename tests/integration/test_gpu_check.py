"""benchmarks/gpu_check.sh --dry-run: every step of the GPU check at toy size on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STEPS = ("tests", "parity", "head", "train_r50", "train_r100", "loader", "syncs")

pytestmark = pytest.mark.slow


def test_gpu_check_dry_run_writes_json_and_markdown(tmp_path):
    out = tmp_path / "gc"
    # This interpreter: CI runs the suite from .venv without putting it on PATH.
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=280, env=env)
    summary = json.loads((out / "gpu_check.json").read_text())
    assert proc.returncode == 0, (proc.stdout[-3000:], {k: s.get("log_tail") for k, s in summary["steps"].items()})
    assert summary["dry_run"] and summary["overall"] == "pass"
    assert list(summary["steps"]) == list(STEPS)
    for name, step in summary["steps"].items():
        assert step["status"] in ("pass", "info"), (name, step)
    parity = summary["steps"]["parity"]["figures"]["rows"]
    assert {(r["method"], r["dtype"]) for r in parity} >= {("arcface", "fp32"), ("arcface", "bf16")}
    head = summary["steps"]["head"]["figures"]
    assert head["emulated_world"] == 8 and {r["rate"] for r in head["rows"]} == {0.1, 0.3}
    assert {r["design"] for r in head["rows"]} == {"reference", "ours_arcface", "ours_s6"}
    for bb in ("r50", "r100"):
        assert summary["steps"][f"train_{bb}"]["figures"]["images_per_s_per_device"] > 0
    assert summary["steps"]["loader"]["figures"]["images_per_s"] > 0
    assert summary["steps"]["syncs"]["figures"]["python_read_problems"] == []
    md = (out / "gpu_check.md").read_text()
    assert "Overall: **pass**" in md and ">= 5,000" in md and "(<= 0.7x)" in md


def test_gpu_check_rejects_unknown_arguments(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--bogus"], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "unknown argument --bogus" in proc.stderr


def test_gpu_check_names_an_interpreter_without_torch(tmp_path):
    env = dict(os.environ, PYTHON="/bin/false")
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=30, env=env)
    assert proc.returncode == 2 and "/bin/false cannot import torch; set PYTHON=" in proc.stderr

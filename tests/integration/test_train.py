"""End-to-end training on CPU: real torchrun, real DALI (CPU decode), real Prometheus endpoint.

Each torchrun job runs `python -m train train` on a tiny generated identity dataset. The tests
cover: a 2-rank run whose loss falls (scraping its metrics endpoint while it runs, exporting
ONNX); exact resume after a stop signal; resume on other world sizes; the DeepSpeed engine.
"""

from __future__ import annotations

import math
import re
import signal
import subprocess
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from . import util

pytestmark = pytest.mark.slow

_STEP_RE = re.compile(r"step (\d+)/(\d+) epoch \d+ loss ([0-9.naninf]+) \(ce ([0-9.]+)")


def _losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in util.log_lines(run_dir):
        m = _STEP_RE.search(line)
        if m:
            out[int(m.group(1))] = float(m.group(3))
    return out


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


def test_two_rank_run_learns_serves_metrics_and_exports_onnx(data_dir, tmp_path):
    """2 ranks, s6 on DALI CPU: loss falls; both ranks' endpoints answer mid-run; ONNX matches."""
    from train.metrics import port_file

    run_dir = tmp_path / "learn"
    args = util.base_overrides(data_dir, tmp_path, "learn", **{
        "run.max_steps": 36, "metrics.prometheus": "true", "metrics.per_rank": "true",
        "export.onnx": "true", "checkpoint.every_steps": 12})
    proc = subprocess.Popen(util.torchrun_cmd(2, args), cwd=util.REPO, env=util.env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        scraped = {}
        for rank in (0, 1):
            pf = port_file(run_dir, rank)
            util.wait_for(pf.is_file, 120, f"rank {rank}'s metrics port file", proc)
            url = f"http://127.0.0.1:{int(pf.read_text())}/metrics"

            def has_step(url=url):
                try:
                    text = _scrape(url)
                except OSError:
                    return None
                # phi exists once the bank knows a class (after the first step's update)
                ok = re.search(r'^pfc_loss\{rank="\d",term="ce"\} [0-9.]+', text, re.M) and "pfc_head_phi{" in text
                return text if ok else None

            scraped[rank] = util.wait_for(has_step, 120, f"rank {rank}'s first metrics update", proc, poll=0.05)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out[-6000:]
    for rank, text in scraped.items():
        for series in (f'pfc_step{{rank="{rank}"}}', 'phase="forward"', 'phase="data"', 'phase="backward"',
                       'phase="optimizer"', 'pfc_head_phi{', 'pfc_learning_rate{', 'pfc_images_per_second{',
                       'pfc_grad_norm{', 'pfc_memory_bytes{', f'pfc_world_size{{rank="{rank}"}} 2.0'):
            assert series in text, f"{series} missing from rank {rank}'s endpoint"

    losses = _losses(run_dir)
    assert sorted(losses) == list(range(1, 37))
    first, last = np.mean([losses[s] for s in (1, 2, 3)]), np.mean([losses[s] for s in (34, 35, 36)])
    assert last < first - 0.5, f"loss did not fall: {first:.3f} -> {last:.3f}"

    s = util.summary(run_dir)
    assert s["step"] == 36 and s["skipped_steps"] == 0
    assert 0.0 <= s["eval"]["verification"]["accuracy"] <= 1.0
    assert s["export"]["onnx_max_abs_diff"] <= 1e-4
    # The ONNX file at yet another batch size, against the exported state dict.
    import onnxruntime as ort

    from partial_fc.backbones import build_backbone

    model = build_backbone("iresnet_nano", num_features=128)
    model.load_state_dict(torch.load(s["export"]["state_dict"], weights_only=True)["state_dict"])
    model.eval()
    x = torch.randn(3, 3, 112, 112)
    sess = ort.InferenceSession(s["export"]["onnx"], providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    assert np.abs(got - want).max() <= 1e-4
    meta = {p.key: p.value for p in __import__("onnx").load(s["export"]["onnx"]).metadata_props}
    assert meta["embedding_size"] == "128" and "127.5" in meta["input_normalization"]


def test_stop_signal_then_resume_is_exact(data_dir, tmp_path):
    """SIGUSR1 to one rank mid-run: the job checkpoints and exits 75; rerunning it resumes and
    ends with bit-identical weights, optimizer state and bank to an uninterrupted run."""
    sets = {"run.max_steps": 24}
    util.run_torchrun(2, util.base_overrides(data_dir, tmp_path, "straight", **sets))

    args = util.base_overrides(data_dir, tmp_path, "stopped", **sets)
    run_dir = tmp_path / "stopped"
    proc = subprocess.Popen(util.torchrun_cmd(2, args), cwd=util.REPO, env=util.env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        util.wait_for(lambda: 4 in util.checkpoint_steps(run_dir), 180, "the step-4 checkpoint", proc, poll=0.05)
        util.signal_workers(proc.pid, signal.SIGUSR1, only_one=True)
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0, "the job should report the stop (exit 75 from its workers)"
    stopped_at = max(util.checkpoint_steps(run_dir))
    # A signal that lands right after the step-4 save is seen at that same step boundary.
    assert 4 <= stopped_at < 24, (stopped_at, out[-3000:])
    assert any("stopped by SIGUSR1" in ln for ln in util.log_lines(run_dir)), out[-3000:]

    util.run_torchrun(2, args)
    assert any("resumed from" in ln and f"step_{stopped_at:09d}" in ln for ln in util.log_lines(run_dir))
    a, b = util.final_weights(tmp_path / "straight"), util.final_weights(run_dir)
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"resumed run differs in {diff[:5]}"
    la, lb = _losses(tmp_path / "straight"), _losses(run_dir)
    assert la[24] == lb[24]


@pytest.mark.parametrize("nproc", [1, 3])
def test_resume_on_another_world_size(data_dir, tmp_path, nproc):
    """A 2-rank checkpoint continues on 1 and on 3 ranks (W, bank and optimizer rows resharded)."""
    util.run_torchrun(2, util.base_overrides(data_dir, tmp_path, "two", **{"run.max_steps": 8}))
    ckpt = tmp_path / "two" / "checkpoints" / "step_000000008"
    args = util.base_overrides(data_dir, tmp_path, f"on{nproc}", **{
        "run.max_steps": 12, "checkpoint.resume": f'"{ckpt}"'})
    util.run_torchrun(nproc, args)
    run_dir = tmp_path / f"on{nproc}"
    logs = util.log_lines(run_dir)
    assert any("resumed from" in ln and "step 8" in ln for ln in logs)
    losses = _losses(run_dir)
    assert sorted(losses) == [9, 10, 11, 12] and all(math.isfinite(v) for v in losses.values())
    # The resumed losses are close to where the 2-rank run was (same weights, other batches). Means
    # over 4 steps: one 16-image batch alone varies by +-20% here (the exact resharding of W, bank
    # and optimizer rows is checked value for value in tests/distributed/test_checkpoint.py).
    two = _losses(tmp_path / "two")
    before = sum(two[s] for s in (5, 6, 7, 8)) / 4
    after = sum(losses[s] for s in (9, 10, 11, 12)) / 4
    assert abs(after - before) < 0.2 * before, (two, losses)
    s = util.summary(run_dir)
    assert s["step"] == 12
    # Its own checkpoint is a valid 1- or 3-shard checkpoint of the same classes.
    shards = sorted((run_dir / "checkpoints" / "step_000000012").glob("head_classes_*.pt"))
    assert len(shards) == nproc


# The first DeepSpeed run on a fresh venv compiles a CPU op (~50 s idle, minutes on a loaded box).
@pytest.mark.timeout(900)
def test_deepspeed_engine_matches_ddp(data_dir, tmp_path, monkeypatch):
    """ZeRO-1 (fp32 engine, gloo, CPU) trains; its first losses equal DDP's."""
    pytest.importorskip("deepspeed")
    # No clipping: DeepSpeed clips the (partitioned) backbone by its own norm, DDP by the global one.
    steps = {"run.max_steps": 4, "checkpoint.every_steps": 0, "optimizer.grad_clip": 0}
    util.run_torchrun(2, util.base_overrides(data_dir, tmp_path, "ddp", **steps))
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    util.run_torchrun(2, util.base_overrides(data_dir, tmp_path, "ds", **steps, **{
        "distributed.engine": '"deepspeed"', "distributed.zero_stage": 1}), timeout=420)
    ddp, ds = _losses(tmp_path / "ddp"), _losses(tmp_path / "ds")
    assert sorted(ds) == [1, 2, 3, 4]
    assert ds[1] == pytest.approx(ddp[1], abs=1e-4)
    for s in (2, 3, 4):
        assert ds[s] == pytest.approx(ddp[s], rel=2e-3), (ddp, ds)
    assert util.summary(tmp_path / "ds")["step"] == 4

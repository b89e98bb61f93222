"""Launch paths on CPU, with real processes: two torchrun "nodes" on one machine through
launch/torchrun.sh, a lost worker recovered by torchrun's restart with an exact resume, and
(when a localhost Slurm can be started) the one-task-per-rank Slurm script under real sbatch.

PFC_SLURM_TESTS=auto (default: skip with the reason when Slurm cannot start), require (fail
instead), off. With PFC_SLURM_INSTALL=1 (set by `make test`) the localhost cluster script
installs slurm-wlm with apt-get when it is missing; see docs/launch.md.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from . import util

pytestmark = pytest.mark.slow

LAUNCH = util.REPO / "launch"


def _kill_all(procs):
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        try:
            p.communicate(timeout=30)
        except (subprocess.TimeoutExpired, ValueError):
            pass


def _check_checkpoint_loads(run_dir: Path, world: int) -> None:
    """The latest checkpoint has ``world`` head shards that tile the classes and loads in one process."""
    from partial_fc import PartialFCHead
    from train.checkpoint import find_latest, load_checkpoint, read_manifest
    from train.config import load_config

    path = find_latest(run_dir / "checkpoints")
    manifest = read_manifest(path)
    assert manifest["world_size"] == world
    ranges = sorted((s["start"], s["end"]) for s in manifest["shards"])
    assert len(ranges) == world
    # Contiguous, non-overlapping, from 0 to num_classes: every class exactly once.
    assert ranges[0][0] == 0 and ranges[-1][1] == manifest["num_classes"] == 32
    assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(ranges, ranges[1:])), ranges
    assert sorted(p.name for p in path.glob("head_classes_*.pt")) == sorted(s["file"] for s in manifest["shards"])
    cfg = load_config(run_dir / "config.toml")
    head = PartialFCHead(cfg.head)
    from partial_fc.backbones import build_backbone

    backbone = build_backbone(cfg.backbone.name, num_features=cfg.backbone.num_features)
    extra = load_checkpoint(path, head, None, backbone=backbone, restore_rng=False)  # verifies sha256
    assert extra["train_state"]["step"] == manifest["step"]
    w = util.final_weights(run_dir)
    assert torch.equal(head.weight.detach(), w["head.weight"])
    assert torch.isfinite(head.weight).all()


# ------------------------------------------------------------------------------ torchrun, 2 nodes
def test_two_nodes_on_one_machine(data_dir, tmp_path):
    """Two torchrun agents (launch/torchrun.sh, NNODES=2, 2 processes each) on 127.0.0.1: world 4."""
    port = util.free_port()
    args = util.base_overrides(data_dir, tmp_path, "nodes", **{"run.max_steps": 3, "checkpoint.every_steps": 0, "evaluation.bin_files": "[]"})
    procs = []
    try:
        for node in range(2):
            env = util.env()
            env.update(NNODES="2", NPROC_PER_NODE="2", RDZV_ENDPOINT=f"127.0.0.1:{port}", RDZV_ID="two-nodes",
                       RECIPE="cpu_demo", PYTHON=sys.executable)
            procs.append(subprocess.Popen(["bash", str(LAUNCH / "torchrun.sh"), *args, "--no-export"],
                                          cwd=util.REPO, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
        outs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        _kill_all(procs)
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-6000:]
        # The wrapper prints the command it runs.
        assert re.search(r"^\+ .* -m torch\.distributed\.run --nnodes=2 --nproc-per-node=2 --rdzv-backend=c10d "
                         rf"--rdzv-endpoint=127\.0\.0\.1:{port} ", out, re.M), out[:2000]
    run_dir = tmp_path / "nodes"
    assert sorted(p.name for p in run_dir.glob("train_rank*.log")) == [f"train_rank{r}.log" for r in range(4)]
    s = util.summary(run_dir)
    assert s["step"] == 3 and s["total_steps"] == 3
    assert any("4 rank(s)" in ln for ln in util.log_lines(run_dir))
    _check_checkpoint_loads(run_dir, world=4)


# ------------------------------------------------------------------------------ SIGTERM -> 75
def test_sigterm_to_torchrun_sh_exits_75_with_a_complete_checkpoint(data_dir, tmp_path):
    """Docker/Kubernetes stop the entry point with SIGTERM: torchrun's agent forwards it, the
    workers checkpoint and exit 75, and launch/torchrun.sh reports 75 (torchrun itself says 1)."""
    args = util.base_overrides(data_dir, tmp_path, "term", **{"run.max_steps": 400, "checkpoint.every_steps": 0,
                                                               "evaluation.bin_files": "[]"})
    env = util.env()
    env.update(NPROC_PER_NODE="2", RDZV_ENDPOINT=f"127.0.0.1:{util.free_port()}", RECIPE="cpu_demo",
               PYTHON=sys.executable, SHUTDOWN_TIMEOUT="60")
    run_dir = tmp_path / "term"
    log0 = run_dir / "train_rank0.log"
    proc = subprocess.Popen(["bash", str(LAUNCH / "torchrun.sh"), *args, "--no-export"], cwd=util.REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        util.wait_for(lambda: log0.is_file() and " step 2/400 " in log0.read_text(), 180, "step 2", proc)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        _kill_all([proc])
    assert proc.returncode == 75, out[-6000:]
    assert "the workers' own exit code is 75" in out, out[-3000:]
    steps = util.checkpoint_steps(run_dir)
    assert steps and 2 <= steps[-1] < 400, steps
    assert any("stopped by SIGTERM" in ln for ln in util.log_lines(run_dir))
    _check_checkpoint_loads(run_dir, world=2)


# ------------------------------------------------------------------------------ lost worker
def test_lost_worker_restarts_and_resumes_exactly(data_dir, tmp_path):
    """SIGKILL one of 2 workers after the step-4 checkpoint; torchrun (launch/torchrun.sh,
    MAX_RESTARTS=1) restarts the group, training resumes from the latest checkpoint and ends
    bit-identical to a run that was never interrupted."""
    sets = {"run.max_steps": 10, "checkpoint.every_steps": 4, "evaluation.bin_files": "[]"}
    util.run_torchrun(2, util.base_overrides(data_dir, tmp_path, "straight", **sets) + ["--no-export"])

    run_dir = tmp_path / "killed"
    args = util.base_overrides(data_dir, tmp_path, "killed", **sets) + ["--no-export"]
    env = util.env()
    env.update(NPROC_PER_NODE="2", MAX_RESTARTS="1", RDZV_ENDPOINT=f"127.0.0.1:{util.free_port()}",
               RECIPE="cpu_demo", PYTHON=sys.executable)
    env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)  # the wrapper's default is under test
    # The wrapper runs torchrun as its child (to keep the workers' exit codes): proc.pid is bash,
    # its child the elastic agent, and the agent's children the workers.
    proc = subprocess.Popen(["bash", str(LAUNCH / "torchrun.sh"), *args], cwd=util.REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        util.wait_for(lambda: 4 in util.checkpoint_steps(run_dir), 180, "the step-4 checkpoint", proc, poll=0.05)
        agent = util.wait_for_child(proc.pid, "torch.distributed.run", 60, proc)
        util.wait_for(lambda: len(util.children(agent)) == 2, 60, "the 2 workers", proc, poll=0.05)
        killed = util.signal_workers(agent, signal.SIGKILL, only_one=True)
        assert len(killed) == 1
        out, _ = proc.communicate(timeout=240)
    finally:
        _kill_all([proc])
    assert proc.returncode == 0, out[-6000:]
    logs = util.log_lines(run_dir)
    resumed = [ln for ln in logs if "resumed from" in ln]
    assert len(resumed) == 1, out[-4000:]
    # Killed before the step-8 checkpoint, or while it was being written: resumed at 4; after it: at 8.
    at = int(re.search(r"at step (\d+)", resumed[0]).group(1))
    assert at in (4, 8), resumed
    steps = [int(m.group(1)) for ln in logs if (m := re.search(r"step (\d+)/10 ", ln))]
    # Every step is done; the ones after the resumed checkpoint are done again (at most 4 lost).
    assert set(steps) == set(range(1, 11)) and steps[-1] == 10
    assert util.summary(run_dir)["step"] == 10
    a, b = util.final_weights(tmp_path / "straight"), util.final_weights(run_dir)
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"recovered run differs in {diff[:5]}"


# ------------------------------------------------------------------------------ real Slurm
def _slurm_mode() -> str:
    mode = os.environ.get("PFC_SLURM_TESTS", "auto")
    if mode not in ("auto", "require", "off"):
        raise ValueError(f"PFC_SLURM_TESTS={mode!r}: use auto, require or off")
    return mode


@pytest.fixture(scope="module")
def slurm_conf():
    """Starts the localhost Slurm cluster (or reuses a running one); skips with the reason under
    auto. A cluster this fixture started is stopped afterwards."""
    mode = _slurm_mode()
    if mode == "off":
        pytest.skip("PFC_SLURM_TESTS=off")
    script = LAUNCH / "slurm" / "localhost_cluster.sh"
    env = dict(os.environ, PFC_SLURM_DIR=os.environ.get("PFC_SLURM_DIR", "/tmp/pfc-slurm"))
    was_up = subprocess.run(["bash", str(script), "status"], env=env, capture_output=True, timeout=30).returncode == 0
    try:
        # apt-get (PFC_SLURM_INSTALL=1, slurm-wlm missing) takes ~10 s; its runs are capped at 120 s each.
        p = subprocess.run(["bash", str(script), "start"], env=env, capture_output=True, text=True, timeout=400)
        reason = (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]
        ok = p.returncode == 0
    except subprocess.TimeoutExpired:
        ok, reason = False, "localhost_cluster.sh start timed out"
    if not ok:
        if mode == "require":
            pytest.fail(f"PFC_SLURM_TESTS=require but Slurm did not start: {reason}")
        pytest.skip(f"no localhost Slurm: {reason}")
    yield p.stdout.strip().splitlines()[-1].split("=", 1)[1]
    if not was_up:
        subprocess.run(["bash", str(script), "stop"], env=env, capture_output=True, timeout=60)


def _job(job: str, env: dict) -> dict:
    """``scontrol show job`` fields (JobState, Reason, Restarts, ...); finished jobs stay listed
    for MinJobAge (300 s), unlike squeue, which also skips jobs in transition."""
    p = subprocess.run(["scontrol", "-o", "show", "job", job], env=env, capture_output=True, text=True, timeout=10)
    assert p.returncode == 0, p.stderr
    return dict(f.split("=", 1) for f in p.stdout.split() if "=" in f)


_DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED")


@pytest.mark.timeout(600)  # includes starting (maybe installing) Slurm
def test_slurm_one_task_per_rank_with_requeue(slurm_conf, data_dir, tmp_path):
    """sbatch launch/slurm/train_per_task.sbatch with 2 tasks (no torchrun): the trainer maps
    SLURM_PROCID/SLURM_LOCALID/SLURM_STEP_NUM_TASKS to ranks. SIGUSR1 to the batch shell (what
    --signal=B:USR1@N delivers before the time limit) -> checkpoint -> exit 75 -> the job requeues
    itself, resumes from that checkpoint and completes on world 2."""
    env = util.env()
    env.update(SLURM_CONF=slurm_conf, PYTHON=sys.executable, RECIPE="cpu_demo")
    for k in [k for k in env if k.startswith("SLURM_") and k != "SLURM_CONF"]:
        del env[k]
    log = tmp_path / "slurm.out"
    run_dir = tmp_path / "slurm"
    args = util.base_overrides(data_dir, tmp_path, "slurm", **{
        "run.max_steps": 6, "checkpoint.every_steps": 2, "evaluation.bin_files": "[]"})
    # The script asks for 2 nodes x 8 GPUs; a one-node CPU test overrides the shape on the command line.
    sub = subprocess.run(
        ["sbatch", "--parsable", "--nodes=1", "--ntasks=2", "--ntasks-per-node=2", "--overcommit",
         "--cpus-per-task=1", "--gpus-per-node=0", "--time=10", f"--output={log}",
         str(LAUNCH / "slurm" / "train_per_task.sbatch"), *args, "--no-export"],
        cwd=util.REPO, env=env, capture_output=True, text=True, timeout=30)
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip().split(";")[0]
    try:
        util.wait_for(lambda: 2 in util.checkpoint_steps(run_dir), 180, "the step-2 checkpoint", poll=0.1)
        subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=env, check=True, timeout=10)
        # Slurm holds a requeued job back for cred_expire seconds (Reason=BeginTime; 10 s on the
        # localhost cluster, 120 s by default); starting it sooner fails ("credential revoked").
        util.wait_for(lambda: _job(job, env).get("Restarts") == "1", 120, "the requeue")
        util.wait_for(lambda: _job(job, env)["JobState"] in _DONE, 180, "the requeued job to finish", poll=0.5)
    finally:
        if _job(job, env)["JobState"] not in _DONE:
            subprocess.run(["scancel", job], env=env, timeout=10)
    assert _job(job, env)["JobState"] == "COMPLETED", _job(job, env)
    out = log.read_text()
    assert "got SIGUSR1, forwarding to srun" in out and f"requeueing job {job} (restart 1)" in out, out[-6000:]
    assert "stopped by SIGUSR1" in out, out[-6000:]
    assert f"job {job} restart 1: 2 task(s)" in out and "training step exited with status 0" in out, out[-6000:]
    logs = util.log_lines(run_dir)
    resumed = [ln for ln in logs if "resumed from" in ln]
    assert len(resumed) == 1 and int(re.search(r"at step (\d+)", resumed[0]).group(1)) >= 2, resumed
    assert any("2 rank(s)" in ln for ln in logs), logs[:20]
    assert (run_dir / "train_rank1.log").is_file()
    assert util.summary(run_dir)["step"] == 6
    _check_checkpoint_loads(run_dir, world=2)

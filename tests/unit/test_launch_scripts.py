"""The launch scripts as programs: they parse (bash -n), launch/torchrun.sh prints the command
it would run (DRY_RUN=1) for one and several nodes, and bad knobs are clear errors."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"
SCRIPTS = sorted([*LAUNCH.rglob("*.sh"), *LAUNCH.rglob("*.sbatch")])


def _torchrun(*args: str, **knobs: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in (
        "NNODES", "NPROC_PER_NODE", "NODE_RANK", "RDZV_ENDPOINT", "RDZV_ID", "RECIPE", "MAX_RESTARTS",
        "SIGNALS_TO_HANDLE", "SHUTDOWN_TIMEOUT", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE")}
    env.update(DRY_RUN="1", PYTHON="python3", USER="tester", **knobs)
    return subprocess.run(["bash", str(LAUNCH / "torchrun.sh"), *args], env=env, capture_output=True, text=True,
                          timeout=30)


def _printed(p: subprocess.CompletedProcess) -> list[str]:
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("+ ")]
    assert len(lines) == 1, p.stderr
    return shlex.split(lines[0][2:])


def test_scripts_exist_and_parse():
    names = {str(p.relative_to(LAUNCH)) for p in SCRIPTS}
    assert {"lib.sh", "torchrun.sh", "slurm/localhost_cluster.sh", "slurm/train.sbatch",
            "slurm/train_per_task.sbatch"} <= names
    for p in SCRIPTS:
        r = subprocess.run(["bash", "-n", str(p)], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, f"{p}: {r.stderr}"
        if p.name != "lib.sh":  # sourced, not run
            assert os.access(p, os.X_OK), f"{p} is not executable"


def test_torchrun_one_node_defaults():
    p = _torchrun()
    assert p.returncode == 0, p.stderr
    assert _printed(p) == [
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1", "python3", "-m", "torch.distributed.run", "--nnodes=1",
        "--nproc-per-node=1", "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:29400", "--rdzv-id=pfc-tester",
        "--max-restarts=0", "-m", "train", "train", "--config", "cpu_demo"]


def test_torchrun_several_nodes_and_overrides():
    p = _torchrun("data.batch_size=64", "--set", 'run.name="a b"', "--no-export", NNODES="4",
                  NPROC_PER_NODE="gpu", NODE_RANK="2", RDZV_ENDPOINT="head:29500", RDZV_ID="job7",
                  RECIPE="ms1mv3_r50", MAX_RESTARTS="3", SIGNALS_TO_HANDLE="SIGTERM,SIGUSR1",
                  SHUTDOWN_TIMEOUT="300", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="0")
    assert p.returncode == 0, p.stderr
    assert _printed(p) == [
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=0", "python3", "-m", "torch.distributed.run", "--nnodes=4",
        "--nproc-per-node=gpu", "--rdzv-backend=c10d", "--rdzv-endpoint=head:29500", "--rdzv-id=job7",
        "--max-restarts=3", "--signals-to-handle=SIGTERM,SIGUSR1", "--shutdown-timeout=300", "--node-rank=2",
        "-m", "train", "train", "--config", "ms1mv3_r50",
        "--set", "data.batch_size=64", "--set", 'run.name="a b"', "--no-export"]


def test_torchrun_elastic_node_range():
    p = _torchrun(NNODES="2:4", RDZV_ENDPOINT="head:29500")
    assert p.returncode == 0 and "--nnodes=2:4" in _printed(p), p.stderr


@pytest.mark.parametrize("args, knobs, message", [
    ((), {"NNODES": "2"}, "NNODES=2 needs RDZV_ENDPOINT=host:port"),
    ((), {"NNODES": "two"}, "NNODES must be a non-negative integer, got 'two'"),
    ((), {"NPROC_PER_NODE": "8x"}, "NPROC_PER_NODE must be a non-negative integer"),
    ((), {"MAX_RESTARTS": "-1"}, "MAX_RESTARTS must be a non-negative integer"),
    ((), {"RDZV_ENDPOINT": "head"}, "RDZV_ENDPOINT must be host:port, got 'head'"),
    ((), {"SHUTDOWN_TIMEOUT": "5m"}, "SHUTDOWN_TIMEOUT must be a non-negative integer"),
    (("a=1", "oops"), {}, "extra argument 'oops' is neither KEY=VALUE"),
    (("--set",), {}, "'--set' needs a value"),
])
def test_torchrun_bad_knobs_are_clear_errors(args, knobs, message):
    p = _torchrun(*args, **knobs)
    assert p.returncode == 2 and message in p.stderr, p.stderr
    assert "+ " not in p.stderr, "nothing is launched after an error"


def test_sbatch_scripts_requeue_and_forward_the_preemption_signal():
    for name, launcher in (("train.sbatch", "launch/torchrun.sh"), ("train_per_task.sbatch", "-m train train")):
        text = (LAUNCH / "slurm" / name).read_text()
        directives = dict(m.groups() for m in re.finditer(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, re.M))
        assert "requeue" in directives and re.fullmatch(r"B:USR1@\d+", directives["signal"]), directives
        assert "pfc_run_requeueable srun" in text and launcher in text
    per_node = (LAUNCH / "slurm" / "train.sbatch").read_text()
    assert re.search(r"^#SBATCH --ntasks-per-node=1$", per_node, re.M)
    # torchrun must forward SIGUSR1 to its workers (its default set lacks it).
    assert "SIGUSR1" in re.search(r"SIGNALS_TO_HANDLE=.*", per_node).group(0)


def test_localhost_cluster_usage_and_status():
    script = str(LAUNCH / "slurm" / "localhost_cluster.sh")
    p = subprocess.run(["bash", script], capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "usage:" in p.stderr
    env = dict(os.environ, PFC_SLURM_DIR="/nonexistent/pfc-slurm-test")
    p = subprocess.run(["bash", script, "status"], env=env, capture_output=True, text=True, timeout=30)
    assert p.returncode != 0  # no cluster was started in that directory


@pytest.mark.parametrize("rc, recorded, want", [
    (0, {}, 0),
    (1, {}, 1),                                       # nothing recorded (killed): the launcher's code
    (1, {"round0.rank0": 75, "round0.rank1": 75}, 75),  # checkpointed on a signal
    (1, {"round0.rank0": 75, "round0.rank1": 0}, 75),
    (1, {"round0.rank0": 75}, 75),                    # rank 1 killed after the collective save
    (1, {"round0.rank0": 75, "round0.rank1": 1}, 1),  # a crash is a crash
    (1, {"round0.rank0": 2, "round0.rank1": 2}, 2),
    (1, {"round0.rank0": 3, "round0.rank1": 3}, 3),
    (1, {"round0.rank0": 2, "round0.rank1": 1}, 1),
    (1, {"round0.rank0": 1, "round1.rank0": 75, "round1.rank1": 75}, 75),  # the latest round counts
    (137, {"round2.rank0": 1, "round10.rank0": 3}, 3),
])
def test_worker_exit_maps_the_workers_own_codes(tmp_path, rc, recorded, want):
    """torchrun's agent returns 1 whatever its workers said; launch/lib.sh recovers their code."""
    for name, code in recorded.items():
        (tmp_path / name).write_text(f"{code}\n")
    r = subprocess.run(["bash", "-c", f'. "{LAUNCH}/lib.sh"; set -euo pipefail; pfc_worker_exit {rc} "{tmp_path}"'],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.strip() == str(want), r.stderr
    from train.cli import workers_exit_code  # `pfc demo`'s copy of the rule

    assert workers_exit_code(rc, tmp_path) == want


def test_train_records_its_exit_status_for_the_launcher(tmp_path, monkeypatch, capsys):
    """`pfc train` writes round<restart>.rank<rank> with its code; a bad config is a clean exit 2."""
    from train.cli import main

    monkeypatch.setenv("PFC_EXIT_STATUS_DIR", str(tmp_path))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    assert main(["train", "--set", "optimizer.lr=nan"]) == 2
    assert (tmp_path / "round2.rank1").read_text() == "2\n"
    err = capsys.readouterr().err
    assert "optimizer.lr must be a finite number" in err and "Traceback" not in err

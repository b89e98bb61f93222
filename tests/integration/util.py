"""Helpers of the end-to-end tests: real torchrun jobs of `python -m train train` on CPU."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_overrides(data_dir: Path, out_dir: Path, name: str, **extra) -> list[str]:
    """``--set`` arguments of a small, fast CPU run on the test dataset in ``data_dir``."""
    sets = {
        "run.name": f'"{name}"',
        "run.output_dir": f'"{out_dir}"',
        "run.log_every": "1",
        "data.kind": '"dali"',
        "data.train_rec": f'"{data_dir / "train.rec"}"',
        "data.batch_size": "16",
        "data.synth.out_dir": f'"{data_dir}"',
        "evaluation.bin_files": f'["{data_dir / "verification.bin"}"]',
        "evaluation.every_steps": "0",
        "evaluation.batch_size": "100",
        "evaluation.far_targets": "[0.1, 0.01]",
        "checkpoint.every_steps": "4",
        "checkpoint.keep_last": "0",
        "metrics.progress_bar": "false",
        "export.onnx": "false",
        "distributed.timeout_s": "120",
    }
    sets.update({k: str(v) for k, v in extra.items()})
    out = []
    for k, v in sets.items():
        out += ["--set", f"{k}={v}"]
    return out


def env() -> dict:
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def torchrun_cmd(nproc: int, args: Sequence[str], max_restarts: int = 0) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc-per-node={nproc}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", f"--max-restarts={max_restarts}",
            "-m", "train", "train", *args]


def run_torchrun(nproc: int, args: Sequence[str], timeout: float = 240, cwd: Optional[Path] = None,
                 check: bool = True) -> subprocess.CompletedProcess:
    """Runs a training job to completion; on failure the assertion shows its output tail."""
    p = subprocess.run(torchrun_cmd(nproc, args), cwd=cwd or REPO, env=env(), capture_output=True,
                       text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"torchrun exited {p.returncode}\n--- stdout ---\n{p.stdout[-6000:]}\n"
                             f"--- stderr ---\n{p.stderr[-6000:]}")
    return p


def children(pid: int) -> list[int]:
    """Direct child pids of ``pid`` (from /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...; comm may contain spaces, so split after the last ')'
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            out.append(int(d.name))
    return out


def wait_for(pred, timeout: float, what: str, proc: Optional[subprocess.Popen] = None, poll: float = 0.2):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = pred()
        if v:
            return v
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"job exited ({proc.returncode}) before {what}:\n{out[-6000:]}")
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def wait_for_child(pid: int, needle: str, timeout: float, proc=None) -> int:
    """The first direct child of ``pid`` whose command line contains ``needle``."""
    found: list[int] = []

    def look() -> bool:
        for c in children(pid):
            try:
                cmd = Path(f"/proc/{c}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if needle in cmd:
                found.append(c)
                return True
        return False

    wait_for(look, timeout, f"a child of {pid} running {needle}", proc, poll=0.05)
    return found[0]


def signal_workers(torchrun_pid: int, sig: signal.Signals, only_one: bool = True) -> list[int]:
    """Sends ``sig`` to the worker processes of a torchrun agent."""
    pids = children(torchrun_pid)
    targets = pids[:1] if only_one else pids
    for p in targets:
        os.kill(p, sig)
    return targets


def checkpoint_steps(run_dir: Path) -> list[int]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(p.name.split("_")[1]) for p in root.iterdir()
                  if p.name.startswith("step_") and "." not in p.name and (p / "manifest.json").is_file())


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """Backbone state + the full head W (shards concatenated) + bank of the latest checkpoint."""
    from train.checkpoint import export_backbone_state, find_latest

    path = find_latest(run_dir / "checkpoints")
    assert path is not None, f"no checkpoint in {run_dir}"
    out = {f"backbone.{k}": v for k, v in export_backbone_state(path).items()}
    shards = sorted(path.glob("head_classes_*.pt"))
    parts: dict[str, list[torch.Tensor]] = {}
    for f in shards:
        payload = torch.load(f, weights_only=True)
        for k, v in payload["state"].items():
            parts.setdefault(k, []).append(v)
        for name, o in payload["optim"].items():
            for k, v in o["rows"].items():
                parts.setdefault(f"optim.{name}.{k}", []).append(v)
    out.update({f"head.{k}": torch.cat(v) for k, v in parts.items()})
    return out


def log_lines(run_dir: Path, rank: int = 0) -> list[str]:
    return (run_dir / f"train_rank{rank}.log").read_text().splitlines()


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())

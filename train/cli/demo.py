"""``pfc demo``: the README's main job on a fresh CPU machine.

Makes the synthetic dataset, trains the recipe (default ``cpu_demo``: the paper's full method s6,
DALI CPU decode) on ``--nproc`` ranks under torchrun, which evaluates and exports ONNX at the end,
and prints where everything is.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .verb import Verb, add_recipe_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_recipe_arguments(p)
    g = p.add_argument_group("run")
    g.add_argument("--nproc", type=int, default=2, help="ranks (processes) on this machine (default 2)")
    g.add_argument("--fresh", action="store_true", help="delete the previous demo run directory first")


def _torchrun(args: argparse.Namespace) -> int:
    """``python -m train train`` on ``--nproc`` local ranks; the workers' own exit code."""
    from .exit_status import EXIT_STATUS_DIR_ENV, workers_exit_code

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           "-m", "train", "train"]
    if args.config:
        cmd += ["--config", args.config]
    for o in args.overrides:
        cmd += ["--set", o]
    print("[pfc] running:", " ".join(cmd), flush=True)
    with tempfile.TemporaryDirectory(prefix="pfc-exit.") as status_dir:
        # torchrun reports any worker failure as 1: the workers' own codes (75 after a
        # checkpoint on a signal, 2, 3) come from their records (see workers_exit_code).
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
                   **{EXIT_STATUS_DIR_ENV: status_dir})
        return workers_exit_code(subprocess.call(cmd, env=env), Path(status_dir))


def run(args: argparse.Namespace) -> int:
    """Dataset, then training under torchrun; the training's exit code (2 for a config error)."""
    from ..config import ConfigError, config_from_args
    from .data import ensure_synthetic_dataset

    try:
        cfg = config_from_args(args)
    except ConfigError as e:
        print(f"pfc demo: config error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    if cfg.data.kind != "synthetic":
        s = ensure_synthetic_dataset(cfg)
        how = "reused" if s["reused"] else "made in %.1f s" % s["seconds"]
        print(f"[pfc] dataset {s['out_dir']} ({how})", flush=True)
    if args.fresh and cfg.run_dir.exists():
        import shutil

        shutil.rmtree(cfg.run_dir)
    elif (cfg.checkpoint_dir).exists():
        print(f"[pfc] {cfg.run_dir} has checkpoints: the run resumes from them (pass --fresh to start over)",
              flush=True)
    rc = _torchrun(args)
    if rc == 0:
        print(f"[pfc] demo finished in {time.perf_counter() - t0:.0f} s; the run directory (config, logs, "
              f"checkpoints, export, summary.json) is {cfg.run_dir}", flush=True)
    return rc


VERBS = (Verb(
    "demo", help="the README's main job: synthetic data + 2-rank CPU training under torchrun (eval, ONNX)",
    description="The README's main job on a fresh CPU machine: make the recipe's synthetic dataset, train it "
                "on --nproc ranks under torchrun (evaluation and ONNX export at the end), print where "
                "everything is. A run directory with checkpoints resumes unless --fresh.",
    examples=("pfc demo", "pfc demo --nproc 1 --set run.epochs=1 --fresh"),
    add_arguments=add_arguments, run=run),)

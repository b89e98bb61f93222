"""``pfc train``: one rank of a training job (torchrun/Slurm set the rank environment)."""

from __future__ import annotations

import argparse
import os
import sys

from .verb import Verb, add_recipe_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_recipe_arguments(p)
    p.add_argument_group("output").add_argument("--no-export", action="store_true",
                                                help="skip the backbone export at the end")


def run(args: argparse.Namespace) -> int:
    """Trains; 0 done, 2 bad input, 3 diverged, 75 preempted (see exit_status)."""
    from ..config import ConfigError, config_from_args
    from ..trainer import EXIT_PREEMPTED, NonFiniteLossError, run_training
    from .exit_status import EXIT_BAD_INPUT, EXIT_DIVERGED, clean_error, input_errors

    try:
        cfg = config_from_args(args)
    except ConfigError as e:
        print(f"pfc train: config error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if cfg.head.phi_refresh == "offline":
        # A study control: only `pfc ablate` runs the full pass that fills the bank, and the study
        # found the online estimate better (docs/method.md, section 10). Refused before any work.
        print("pfc train: config error: head.phi_refresh = 'offline' is a study control that only "
              "`pfc ablate` supports (it refreshes the bank by a full pass every epoch); use 'online' "
              "(docs/method.md, section 10)", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        summary = run_training(cfg, export=not args.no_export)
    except input_errors() as e:
        return clean_error("pfc train", e, EXIT_BAD_INPUT)
    except NonFiniteLossError as e:
        return clean_error("pfc train", e, EXIT_DIVERGED)
    if summary.get("preempted"):
        return EXIT_PREEMPTED
    if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0:
        print(format_summary(summary), flush=True)
    return 0


def format_summary(s: dict) -> str:
    """The lines rank 0 prints at the end of a run (run directory, steps, loss, eval, export)."""
    lines = [f"run directory   {s['run_dir']}",
             f"steps           {s['step']}/{s['total_steps']} ({s['skipped_steps']} skipped), "
             f"{s.get('train_seconds', 0):.0f} s"]
    if s.get("final_loss"):
        fl = s["final_loss"]
        lines.append("final loss      " + "  ".join(f"{k} {v:.4f}" for k, v in fl.items()))
    for name, r in (s.get("eval") or {}).items():
        tars = "  ".join(f"TAR@FAR={k}: {v:.4f}" for k, v in r["tar"].items())
        lines.append(f"verification    {name}: accuracy {r['accuracy']:.4f} +- {r['accuracy_std']:.4f}  {tars}")
    exp = s.get("export") or {}
    if exp.get("state_dict"):
        lines.append(f"backbone        {exp['state_dict']}")
    if exp.get("onnx"):
        lines.append(f"ONNX            {exp['onnx']} (max |ORT - torch| {exp['onnx_max_abs_diff']:.1e})")
    if s.get("metrics_url"):
        lines.append(f"metrics         {s['metrics_url']} (served while the run was alive)")
    return "\n".join(lines)


VERBS = (Verb(
    "train", help="train a Partial FC model (one process per rank, under torchrun/Slurm or alone)",
    description="Train a Partial FC model: one process per rank (torchrun or Slurm set the rank environment). "
                "Exit codes: 0 done, 2 bad input or config, 3 diverged, 75 checkpointed on a signal (resumable).",
    examples=("pfc train --config cpu_demo",
              "torchrun --standalone --nproc-per-node=2 -m train train --config cpu_demo --set optimizer.lr=0.05"),
    add_arguments=add_arguments, run=run),)

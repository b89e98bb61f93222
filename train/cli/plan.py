"""``pfc plan``: per-rank memory and all-gather volume of a Partial FC job, and whether it fits
(arithmetic in partial_fc/planner.py, the table in train/plan.py)."""

from __future__ import annotations

import argparse

from .verb import UsageError, Verb


def add_arguments(p: argparse.ArgumentParser) -> None:
    from partial_fc.planner import BACKBONE_TABLE, DTYPE_BYTES

    job = p.add_argument_group("job")
    job.add_argument("--classes", type=int, required=True, help="number of identities")
    job.add_argument("--embedding-size", type=int, default=512, help="embedding dimension D (default 512)")
    job.add_argument("--world-size", type=int, default=8, help="ranks (default 8)")
    job.add_argument("--sample-rate", type=float, default=1.0, help="Partial FC sample rate (default 1.0)")
    job.add_argument("--batch", type=int, default=128, help="samples per rank per micro-step")
    job.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="fp32", help="activation dtype")
    job.add_argument("--backbone", default="none", help=f"one of {sorted(BACKBONE_TABLE)} or 'none'")
    job.add_argument("--method", default="arcface", help="head.method (default arcface)")
    job.add_argument("--con-sample-rate", type=float, default=None,
                     help="head.con_sample_rate: the Con term's own sample rate (default: the CE's sample)")
    job.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd", help="optimizer (default sgd)")
    job.add_argument("--row-update", choices=["lazy", "dense"], default="lazy", help="head row update (default lazy)")
    dev = p.add_argument_group("device")
    dev.add_argument("--overhead-gib", type=float, default=0.0, help="framework / CUDA context per rank")
    dev.add_argument("--gpu-memory-gib", type=float, default=None, help="device memory for the fits verdict")


def run(args: argparse.Namespace) -> int:
    """Prints the plan; 0 when it fits (or no memory was given), else 1."""
    from partial_fc.planner import PlanConfig, plan_memory

    from ..plan import format_plan

    try:
        cfg = PlanConfig(
            num_classes=args.classes, embedding_size=args.embedding_size, world_size=args.world_size,
            sample_rate=args.sample_rate, batch=args.batch, dtype=args.dtype,
            backbone=None if args.backbone in ("none", "") else args.backbone, method=args.method,
            optimizer=args.optimizer, row_update=args.row_update, con_sample_rate=args.con_sample_rate,
            overhead_gib=args.overhead_gib, gpu_memory_gib=args.gpu_memory_gib,
        )
    except ValueError as e:
        raise UsageError(str(e)) from e
    plan = plan_memory(cfg)
    print(format_plan(plan))
    return 0 if plan.fits in (None, True) else 1


VERBS = (Verb(
    "plan", help="per-rank memory and all-gather volume of a Partial FC job, and whether it fits",
    description="Per-rank memory (head shard, optimizer state, activations, backbone) and all-gather volume "
                "of a Partial FC job, and whether it fits in --gpu-memory-gib. Exit code 1 when it does not.",
    examples=("pfc plan --classes 2059906 --world-size 8 --sample-rate 0.3 --batch 128 --backbone r100 "
              "--dtype bf16 --method s6 --gpu-memory-gib 80 --overhead-gib 1.5",),
    add_arguments=add_arguments, run=run),)

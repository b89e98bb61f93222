"""``pfc plan``: per-rank memory and all-gather volume of a Partial FC job, and whether it fits.

Example::

    python -m train plan --classes 2059906 --world-size 8 --sample-rate 0.3 --batch 128 \\
        --backbone r100 --dtype bf16 --method s6 --gpu-memory-gib 80 --overhead-gib 1.5
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from partial_fc.planner import BACKBONE_TABLE, DTYPE_BYTES, GIB, MemoryPlan, PlanConfig, plan_memory

__all__ = ["main", "format_plan"]


def _mib(b: int) -> str:
    return f"{b / 2**20:12,.1f}"


def format_plan(plan: MemoryPlan) -> str:
    """The plan as a text table (MiB and GiB per item, total, traffic, verdict)."""
    cfg = plan.config
    lines = [
        f"Partial FC plan: {cfg.num_classes:,} classes, D={cfg.embedding_size}, world size {cfg.world_size}, "
        f"sample rate {cfg.sample_rate}, batch {cfg.batch}/rank, {cfg.dtype}, backbone "
        f"{cfg.backbone or 'none (fixed embeddings)'}, method {cfg.method}, {cfg.optimizer}, row update {cfg.row_update}",
        f"largest shard: {plan.shard_classes:,} classes; sampled per step: {plan.sampled_classes:,}; "
        f"global batch: {plan.global_batch:,}"
        + (f"; Con candidates per step: {plan.con_sampled_classes:,}" if plan.con_sampled_classes else ""),
        "",
        f"{'per rank':<34}{'MiB':>12}{'GiB':>9}",
    ]
    for name, b in plan.items:
        lines.append(f"{name:<34}{_mib(b)}{b / GIB:9.2f}")
    lines.append(f"{'total':<34}{_mib(plan.total)}{plan.total / GIB:9.2f}")
    lines.append("")
    lines.append(f"all-gather received per rank per step: {plan.allgather_bytes / 2**20:,.2f} MiB "
                 f"(+ reduce-scatter of the embedding gradient {plan.reduce_scatter_bytes / 2**20:,.2f} MiB, "
                 f"all-reduces {plan.allreduce_bytes / 2**10:,.1f} KiB)")
    if plan.fits is not None:
        verdict = "fits" if plan.fits else "does NOT fit"
        lines.append(f"{verdict} in {cfg.gpu_memory_gib:g} GiB per device "
                     f"({plan.total / GIB:.2f} GiB needed, {cfg.gpu_memory_gib - plan.total / GIB:+.2f} GiB left)")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parses flags, prints the plan; returns 0 when it fits (or no memory was given), else 1."""
    p = argparse.ArgumentParser(prog="pfc plan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, required=True, help="number of identities")
    p.add_argument("--embedding-size", type=int, default=512)
    p.add_argument("--world-size", type=int, default=8)
    p.add_argument("--sample-rate", type=float, default=1.0)
    p.add_argument("--batch", type=int, default=128, help="samples per rank per micro-step")
    p.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="fp32", help="activation dtype")
    p.add_argument("--backbone", default="none", help=f"one of {sorted(BACKBONE_TABLE)} or 'none'")
    p.add_argument("--method", default="arcface")
    p.add_argument("--con-sample-rate", type=float, default=None,
                   help="head.con_sample_rate: the Con term's own sample rate (default: the CE's sample)")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    p.add_argument("--row-update", choices=["lazy", "dense"], default="lazy")
    p.add_argument("--overhead-gib", type=float, default=0.0, help="framework / CUDA context per rank")
    p.add_argument("--gpu-memory-gib", type=float, default=None, help="device memory for the fits verdict")
    args = p.parse_args(list(argv) if argv is not None else None)
    try:
        cfg = PlanConfig(
            num_classes=args.classes, embedding_size=args.embedding_size, world_size=args.world_size,
            sample_rate=args.sample_rate, batch=args.batch, dtype=args.dtype,
            backbone=None if args.backbone in ("none", "") else args.backbone, method=args.method,
            optimizer=args.optimizer, row_update=args.row_update, con_sample_rate=args.con_sample_rate,
            overhead_gib=args.overhead_gib, gpu_memory_gib=args.gpu_memory_gib,
        )
    except ValueError as e:
        p.error(str(e))
    plan = plan_memory(cfg)
    print(format_plan(plan))
    return 0 if plan.fits in (None, True) else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""The text table of a per-rank memory plan (:func:`format_plan`); ``pfc plan`` prints it
(its options: train/cli/plan.py).

Example::

    python -m train plan --classes 2059906 --world-size 8 --sample-rate 0.3 --batch 128 \\
        --backbone r100 --dtype bf16 --method s6 --gpu-memory-gib 80 --overhead-gib 1.5
"""

from __future__ import annotations

from typing import Optional, Sequence

from partial_fc.planner import GIB, MemoryPlan

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
    """``pfc plan ARGV`` (the parser lives in train/cli/plan.py); 0 when it fits, else 1."""
    import sys

    from .cli import main as pfc

    return pfc(["plan", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())

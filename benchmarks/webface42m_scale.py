"""A WebFace42M-sized head run: 2,059,906 classes, D = 512, 8 gloo ranks on CPU, full method (s6).

Fixed embeddings (a random ``[batch, 512]`` leaf per rank, one per step, labels uniform over all
classes), the real :class:`partial_fc.PartialFCHead` with ``method="s6"`` (CG-ArcFace, cluster
contrastive and aligning losses, Cluster-Center Bank) and :class:`partial_fc.optim.SparseRowSGD`
(momentum 0.9, weight decay 5e-4), for ``--steps`` steps per sample rate. Per rank it records the
peak resident-set growth from just before the head is built (``ru_maxrss``, fresh processes per
sample rate, ``MALLOC_MMAP_THRESHOLD_=65536`` so freed tensors go back to the OS) and the step
times, and prints them next to ``pfc plan``'s prediction for the same job::

    python benchmarks/webface42m_scale.py --rates 0.1,0.3 --steps 20 --batch 16

Before starting it refuses to run when the planned memory of all ranks together (plus the
measured per-process runtime) exceeds what the machine has available.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.head_step import maxrss_bytes, rss_bytes, spawn_fn  # noqa: E402
from partial_fc.planner import GIB, PlanConfig, plan_memory  # noqa: E402

CLASSES = 2_059_906
RUNTIME_GIB = 0.30  # resident torch + gloo per process before the head exists (measured: 0.26-0.30)


def _available_gib() -> float:
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) for line in f}
    return info["MemAvailable"] / 2**20


def scale_rank(rank: int, world_size: int, classes: int, rate: float, batch: int, steps: int, method: str) -> dict:
    """One rank of the scale run (called inside a gloo process group)."""
    import torch
    import torch.distributed as dist

    from partial_fc import PartialFCHead
    from partial_fc.optim import SparseRowSGD

    g = torch.Generator().manual_seed(10_000 + rank)  # the data stream: its own seed per rank
    base_peak, base_rss = maxrss_bytes(), rss_bytes()
    t0 = time.perf_counter()
    head = PartialFCHead(num_classes=classes, embedding_size=512, sample_rate=rate, method=method, seed=1)
    opt = SparseRowSGD([head.weight], lr=0.1, momentum=0.9, weight_decay=5e-4)
    build_s = time.perf_counter() - t0
    times, losses = [], []
    for _ in range(steps):
        emb = torch.randn(batch, 512, generator=g).requires_grad_()
        labels = torch.randint(0, classes, (batch,), generator=g)
        dist.barrier()
        t = time.perf_counter()
        out = head(emb, labels)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        losses.append(float(out["loss"].detach()))
    return dict(rank=rank, build_s=build_s, times=times, losses=losses, peak_bytes=maxrss_bytes() - base_peak,
                base_rss=base_rss, peak_rss=maxrss_bytes(), stats=head.last_stats)


def _run_rank(rank: int, world_size: int, **kw) -> dict:
    return scale_rank(rank, world_size, **kw)


def main(argv=None) -> int:
    """Runs the sample rates one after the other; writes ``--out`` (JSON) and prints a table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=CLASSES)
    p.add_argument("--world", type=int, default=8)
    p.add_argument("--rates", default="0.1,0.3")
    p.add_argument("--batch", type=int, default=16, help="embeddings per rank per step")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--method", default="s6")
    p.add_argument("--machine-gib", type=float, default=24.0, help="the whole machine's budget")
    p.add_argument("--out", default="benchmarks/results/webface42m_scale.json")
    args = p.parse_args(argv)
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    results = []
    for rate in map(float, args.rates.split(",")):
        plan = plan_memory(PlanConfig(num_classes=args.classes, world_size=args.world, sample_rate=rate,
                                      batch=args.batch, method=args.method))
        need = args.world * (plan.head_total / GIB + RUNTIME_GIB)
        avail = _available_gib()
        print(f"rate {rate}: planned head {plan.head_total / 2**20:,.0f} MiB/rank, all {args.world} ranks with runtime "
              f"{need:.1f} GiB; available now {avail:.1f} GiB", flush=True)
        if need > args.machine_gib or need > avail - 1.0:
            print(f"rate {rate}: refusing to start (needs {need:.1f} GiB)", flush=True)
            results.append(dict(rate=rate, skipped=True, planned_head_bytes=plan.head_total))
            continue
        t0 = time.perf_counter()
        ranks = spawn_fn(_run_rank, args.world, "/tmp/pfc_scale", 1, 7200, classes=args.classes, rate=rate,
                         batch=args.batch, steps=args.steps, method=args.method)
        wall = time.perf_counter() - t0
        peak = max(r["peak_bytes"] for r in ranks)
        steady = [statistics.median(r["times"][2:] or r["times"]) for r in ranks]
        res = dict(rate=rate, world=args.world, classes=args.classes, batch=args.batch, steps=args.steps,
                   method=args.method, planned_head_bytes=plan.head_total, planned_items=plan.items,
                   peak_bytes_per_rank=[r["peak_bytes"] for r in ranks],
                   peak_rss_per_rank=[r["peak_rss"] for r in ranks], base_rss_per_rank=[r["base_rss"] for r in ranks],
                   step_s_median=max(steady), step_s_all_rank0=ranks[0]["times"], build_s=max(r["build_s"] for r in ranks),
                   losses_rank0=ranks[0]["losses"], wall_s=wall, sampled_per_rank=ranks[0]["stats"].get("num_sampled_local"),
                   machine_peak_bytes=sum(r["peak_rss"] for r in ranks), skipped=False)
        results.append(res)
        print(f"rate {rate}: per-rank peak growth {peak / 2**20:,.0f} MiB (max over ranks) vs planned "
              f"{plan.head_total / 2**20:,.0f} MiB ({peak / plan.head_total - 1:+.1%}); sum of per-rank peak RSS "
              f"{res['machine_peak_bytes'] / GIB:.2f} GiB; median step {res['step_s_median']:.2f} s; "
              f"build {res['build_s']:.1f} s; losses {res['losses_rank0'][0]:.2f} -> {res['losses_rank0'][-1]:.2f}",
              flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

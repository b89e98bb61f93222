"""Training stall of a checkpoint save: synchronous vs asynchronous, one rank's head shard.

The state of one rank of an 8-rank job at 2,059,906 classes (WebFace42M): 257,488 classes x 512
fp32 rows of W, their SGD momentum, and the s6 cluster bank (centers and statistics), plus this
rank's RNG file. ``--backbone r50`` adds what rank 0 also writes (the backbone and its optimizer).

* **sync**: :func:`train.checkpoint.save_checkpoint`, which returns after writing, fsyncing,
  re-reading for sha256, committing and retention: all of it stalls training.
* **async**: :class:`train.checkpoint.AsyncCheckpointWriter`: the stall is ``save()``
  (the staging copy of the state); the write, fsync, hash-while-writing, commit and retention run
  in a thread (their time is reported as ``background_s``). A training step is emulated during
  the background write (an in-place update of W), to show the staged copy is what gets written.

Each mode saves ``--repeats`` times (fresh steps; the best is reported: other load only slows a
run) into ``--dir`` (default: a temporary directory on the same disk as the runs); Example::

    nice -n 5 python benchmarks/bench_checkpoint.py --out benchmarks/results/bench_checkpoint.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build(classes: int, world: int, dim: int, backbone: str | None):
    import torch

    from partial_fc import PartialFCHead
    from partial_fc.optim import SparseRowSGD
    from partial_fc.sharding import ClassPartition

    shard = ClassPartition(classes, world).size(0)
    head = PartialFCHead(num_classes=shard, embedding_size=dim, method="s6", sample_rate=0.3, validate_inputs=False)
    opt = SparseRowSGD([head.weight], lr=0.1, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):  # momentum and bank populated by real steps
        emb = torch.randn(1024, dim, generator=g, requires_grad=True)
        head(emb, torch.randint(0, shard, (1024,), generator=g))["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    opt.state[head.weight]["momentum_buffer"] = torch.randn(shard, dim, generator=g)  # a dense buffer, as after many steps
    model, bopt = None, None
    if backbone:
        from partial_fc.backbones import build_backbone

        model = build_backbone(backbone, num_features=dim)
        bopt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for p in model.parameters():
            bopt.state[p]["momentum_buffer"] = torch.zeros_like(p)
    return head, opt, model, bopt, shard


def state_bytes(head, opt, model, bopt) -> int:
    import torch

    n = sum(t.numel() * t.element_size() for t in head.state_dict().values())
    n += sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    if model is not None:
        n += sum(t.numel() * t.element_size() for t in model.state_dict().values())
        n += sum(v.numel() * v.element_size() for s in bopt.state.values() for v in s.values() if torch.is_tensor(v))
    return n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=2_059_906)
    p.add_argument("--world", type=int, default=8)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--backbone", default=None, help="also save a backbone and its optimizer (rank 0's share)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dir", default=None, help="checkpoint directory (default: a temporary one)")
    p.add_argument("--out", default=None, help="write the JSON result here")
    args = p.parse_args(argv)

    import torch

    from partial_fc.distributed import ParallelContext
    from train.checkpoint import save_checkpoint
    from train.checkpoint import AsyncCheckpointWriter

    head, opt, model, bopt, shard = build(args.classes, args.world, args.dim, args.backbone)
    nbytes = state_bytes(head, opt, model, bopt)
    work = Path(args.dir or tempfile.mkdtemp(prefix="pfc_bench_ckpt_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"one rank of {args.world} at {args.classes:,} classes: {shard:,} classes x {args.dim}, state "
          f"{nbytes / 2**30:.2f} GiB; writing to {work}", flush=True)
    kw = dict(backbone=model, backbone_optimizer=bopt, extra_state={"note": "bench"}, keep_last=1)
    result = {"classes": args.classes, "world": args.world, "shard_classes": shard, "dim": args.dim,
              "backbone": args.backbone, "state_gib": round(nbytes / 2**30, 3), "machine": platform.node(),
              "cpus": os.cpu_count(), "torch": torch.__version__, "dir": str(work), "sync": [], "async": []}
    step = 0
    try:
        for _ in range(args.repeats):
            step += 1
            t0 = time.perf_counter()
            save_checkpoint(work / "sync", step, head, opt, **kw)
            result["sync"].append({"stall_s": round(time.perf_counter() - t0, 3)})
            print(f"sync  save: stall {result['sync'][-1]['stall_s']:.3f} s", flush=True)
        writer = AsyncCheckpointWriter(work / "async", ParallelContext.from_group(None))
        for _ in range(args.repeats):
            step += 1
            t0 = time.perf_counter()
            writer.save(step, head, opt, **kw)
            stall = time.perf_counter() - t0
            with torch.no_grad():  # training continues meanwhile
                head.weight.add_(1e-3)
            t1 = time.perf_counter()
            writer.wait()
            wait = time.perf_counter() - t1
            pend = writer.last_stall_s
            result["async"].append({"stall_s": round(stall, 3), "staging_s": round(pend, 3),
                                    "wait_after_stall_s": round(wait, 3)})
            print(f"async save: stall {stall:.3f} s (then {wait:.3f} s more in the background)", flush=True)
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    result["sync_stall_s"] = min(r["stall_s"] for r in result["sync"])
    result["async_stall_s"] = min(r["stall_s"] for r in result["async"])
    result["ratio"] = round(result["async_stall_s"] / result["sync_stall_s"], 3)
    print(json.dumps({k: v for k, v in result.items() if k not in ("sync", "async")}), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

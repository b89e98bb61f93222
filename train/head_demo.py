"""A 2-rank demonstration of the model-parallel head (what `make demo` runs until the trainer lands).

Each rank trains a small MLP "backbone" under DDP on synthetic identity features (class prototypes
plus noise whose spread differs per identity, so some identities cluster tightly and others
loosely), with the class centers sharded across ranks and the paper's full method (s6). It prints
the loss terms, the concentration statistics and a held-out verification accuracy.

Run it with torchrun (``python -m train demo`` does this for you)::

    torchrun --nproc_per_node 2 -m train.head_demo --steps 150
"""

from __future__ import annotations

import argparse
import datetime
import os
import time
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from partial_fc import PartialFCHead


ID_DIM = 24  # identity information lives in a 24-d subspace of the 64-d input


def _identities(num_classes: int, in_dim: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(num_classes, ID_DIM, generator=g)
    spread = 0.15 + 0.45 * torch.rand(num_classes, generator=g)  # per-identity difficulty
    return protos, spread


def _sample(protos, spread, labels, g, in_dim: int = 64):
    """Identity latent + per-identity noise, mixed with strong nuisance (pose/light-like) factors.

    A fixed rotation (the same for every identity, seen or unseen) mixes the two, so a random
    backbone confuses identities and a trained one learns to suppress the nuisance directions,
    which transfers to identities it never saw.
    """
    n = labels.numel()
    ident = protos[labels] + spread[labels, None] * torch.randn(n, ID_DIM, generator=g)
    nuisance = 2.5 * torch.randn(n, in_dim - ID_DIM, generator=g)
    mix = torch.linalg.qr(torch.randn(in_dim, in_dim, generator=torch.Generator().manual_seed(12345)))[0]
    return torch.cat([ident, nuisance], dim=1) @ mix


@torch.no_grad()
def _verification_accuracy(model: nn.Module, in_dim: int, seed: int) -> float:
    """Same/different accuracy on pairs of unseen identities at the best threshold."""
    protos, spread = _identities(200, in_dim, seed + 999)
    g = torch.Generator().manual_seed(seed + 1)
    a = torch.randint(0, 200, (2000,), generator=g)
    same = torch.rand(2000, generator=g) < 0.5
    b = torch.where(same, a, torch.randint(0, 200, (2000,), generator=g))
    same = a == b
    fa = F.normalize(model(_sample(protos, spread, a, g)), dim=1)
    fb = F.normalize(model(_sample(protos, spread, b, g)), dim=1)
    sims = (fa * fb).sum(1)
    best = 0.0
    for t in torch.linspace(-1, 1, 401):
        best = max(best, float(((sims > t) == same).float().mean()))
    return best


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, default=300)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=64, help="per rank")
    p.add_argument("--sample-rate", type=float, default=0.5)
    p.add_argument("--method", default="s6")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.set_num_threads(1)
    launched = "RANK" in os.environ
    if launched:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank = dist.get_rank() if launched else 0
    world = dist.get_world_size() if launched else 1
    in_dim, emb_dim = 64, 128
    torch.manual_seed(args.seed)  # identical backbone init on every rank
    backbone = nn.Sequential(nn.Linear(in_dim, 256), nn.ReLU(), nn.Linear(256, emb_dim))
    model = DDP(backbone) if launched else backbone
    head = PartialFCHead(num_classes=args.classes, embedding_size=emb_dim, sample_rate=args.sample_rate,
                         method=args.method, s=32.0, seed=args.seed)
    opt = torch.optim.SGD([{"params": model.parameters()}, {"params": head.parameters()}],
                          lr=0.1, momentum=0.9, weight_decay=5e-4)
    protos, spread = _identities(args.classes, in_dim, args.seed)
    g = torch.Generator().manual_seed(args.seed * 1000 + rank + 1)  # each rank its own batches
    if rank == 0:
        print(f"[demo] {world} rank(s), {args.classes} identities sharded "
              f"{head.num_local_classes} on rank 0, method={args.method}, sample_rate={args.sample_rate}")
        print(f"[demo] verification accuracy before training: {_verification_accuracy(backbone, in_dim, args.seed):.3f}")
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        labels = torch.randint(0, args.classes, (args.batch,), generator=g)
        x = _sample(protos, spread, labels, g)
        lr = 0.1 * (1 - (step - 1) / args.steps) ** 2
        for group in opt.param_groups:
            group["lr"] = lr
        out = head(model(x), labels)
        terms = {k: float(v.detach()) for k, v in out.items()}
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        if rank == 0 and (step % 25 == 0 or step == 1):
            st = head.last_stats
            print(f"[demo] step {step:4d}  loss {terms['loss']:7.3f}  ce {terms['ce']:7.3f}  "
                  f"con {terms['con']:6.3f}  ali {terms['ali']:5.3f}  "
                  f"phi[min/mean/max] {st.get('phi_min', float('nan')):.3f}/{st.get('phi_mean', float('nan')):.3f}/"
                  f"{st.get('phi_max', float('nan')):.3f}  margin {st.get('margin_mean', float('nan')):.3f}")
    if rank == 0:
        elapsed = time.perf_counter() - t0
        acc = _verification_accuracy(backbone, in_dim, args.seed)
        print(f"[demo] {args.steps} steps in {elapsed:.1f}s "
              f"({args.steps * args.batch * world / elapsed:.0f} samples/s over {world} ranks)")
        print(f"[demo] verification accuracy on unseen identities after training: {acc:.3f}")
    if launched:
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

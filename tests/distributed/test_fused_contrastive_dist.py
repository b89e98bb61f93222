"""The fused Con kernel and the head's separate Con sample on 2 and 3 gloo ranks.

1. :func:`fused_cluster_contrastive` with the sampled centers split unevenly across ranks (one rank
   may hold none) equals the unfused single-process loss; the ranks' feature and temperature
   gradient contributions sum to the dense gradients.
2. ``con_sample_rate``: the head's Con term equals the dense Con loss over exactly the classes
   that :func:`partial_fc.sharding.sample_classes` draws from the Con stream
   (:func:`partial_fc.sharding.con_step_seed`) on each rank -- every positive among them -- and
   ``con_sample_rate=1`` gives the Con loss over all classes while the CE stays sampled.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from partial_fc import PartialFCHead
from partial_fc.sharding import ClassPartition, con_step_seed, sample_classes, step_seed
from tests import reference as ref
from tests.unit.test_fused_contrastive import problem, unfused

TOL = dict(rtol=1e-5, atol=1e-5)
SPLITS = {2: [0, 6, 17], 3: [0, 9, 9, 17]}  # column ranges per rank; rank 1 of 3 holds no center


def _kernel_worker(rank: int, world_size: int) -> dict:
    from partial_fc.distributed import ParallelContext
    from partial_fc.fused_contrastive import fused_cluster_contrastive

    ctx = ParallelContext.from_group(None)
    feats, centers, index, valid, target, tau, mask = problem(n=12, seed=4)
    lo, hi = SPLITS[world_size][rank], SPLITS[world_size][rank + 1]
    local_t = torch.where((target >= lo) & (target < hi), target - lo, torch.full_like(target, -1))
    out = {}
    for learn in (False, True):
        f = feats.clone().requires_grad_()
        log_tau = torch.tensor(math.log(0.08), requires_grad=True)
        t = log_tau.exp() if learn else tau[lo:hi]
        loss = fused_cluster_contrastive(f, centers, local_t, t, valid[lo:hi], ctx, mask, index[lo:hi], chunk=4)
        loss.backward()
        out[learn] = (loss.detach(), f.grad.clone(), log_tau.grad.clone() if learn else None)
    return out


@pytest.mark.timeout(180)
@pytest.mark.parametrize("world_size", [2, 3])
def test_kernel_matches_unfused_across_ranks(world_size, tmp_path):
    from partial_fc.distributed import ParallelContext
    from tests.harness import run_distributed

    results = run_distributed(_kernel_worker, world_size, tmp_path)
    ctx = ParallelContext.from_group(None)
    feats, centers, index, valid, target, tau, mask = problem(n=12, seed=4)
    for learn in (False, True):
        f = feats.clone().requires_grad_()
        log_tau = torch.tensor(math.log(0.08), requires_grad=True)
        t = log_tau.exp().expand(17) if learn else tau
        want = unfused(f, centers, target, t, valid, ctx, mask, index)
        want.backward()
        for rank, r in enumerate(results):
            torch.testing.assert_close(r[learn][0], want.detach(), **TOL, msg=f"loss rank {rank}")
        torch.testing.assert_close(sum(r[learn][1] for r in results), f.grad, **TOL)
        if learn:
            torch.testing.assert_close(sum(r[learn][2] for r in results), log_tau.grad, **TOL)


# --- the head's own Con sample ----------------------------------------------------------------------
C, DIM, PER_RANK = 40, 8, 5
HEAD = dict(num_classes=C, embedding_size=DIM, s=16.0, seed=7, sample_rate=0.3, method="s2", temperature="fixed")


def _bank(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(3000 + seed)
    centers = F.normalize(torch.randn(C, DIM, generator=g), dim=1)
    counts = torch.randint(1, 5, (C,), generator=g)
    counts[[3, 17, 30]] = 0
    centers[counts == 0] = 0
    return {"centers": centers, "counts": counts, "mean_dist": torch.rand(C, generator=g) + 0.3,
            "dist_obs": counts.clone()}


def _batch(world_size: int, step: int):
    g = torch.Generator().manual_seed(500 + step)
    return torch.randn(world_size * PER_RANK, DIM, generator=g), torch.randint(0, C, (world_size * PER_RANK,), generator=g)


def _head_worker(rank: int, world_size: int) -> dict:
    out = {}
    for rate in (0.5, 1.0):
        head = PartialFCHead(**HEAD, con_sample_rate=rate, embedding_grad="exact")
        lo, hi = head.class_start, head.class_start + head.num_local_classes
        for key, value in _bank().items():
            getattr(head.bank, key).copy_(value[lo:hi])
        head.bank.mean_dist[head.bank.dist_obs == 0] = 0
        head.eval()  # no bank update, so both steps see the same bank
        for step in range(2):
            head.step.fill_(step)
            x, labels = _batch(world_size, step)
            sl = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
            emb = x[sl].clone().requires_grad_()
            res = head(emb, labels[sl])
            res["con"].backward()
            out[(rate, step)] = (res["con"].detach(), emb.grad.clone(), res["ce"].detach())
    return out


@pytest.mark.timeout(180)
@pytest.mark.parametrize("world_size", [2, 3])
def test_con_sample_rate_draws_own_reproducible_sample(world_size, tmp_path):
    from tests.harness import run_distributed

    results = run_distributed(_head_worker, world_size, tmp_path)
    part = ClassPartition(C, world_size)
    bank = _bank()
    valid = bank["counts"] > 0
    tau = torch.full((C,), 0.1)
    for step in range(2):
        x, labels = _batch(world_size, step)
        con_classes, ce_classes = [], []
        for rank in range(world_size):
            lo, size = part.start(rank), part.size(rank)
            con = sample_classes(labels, lo, size, 0.5, torch.Generator().manual_seed(con_step_seed(7, step, rank)))
            ce = sample_classes(labels, lo, size, 0.3, torch.Generator().manual_seed(step_seed(7, step, rank)))
            assert con.num_sampled == math.ceil(0.5 * size)
            con_classes.append(con.index + lo)
            ce_classes.append(ce.index + lo)
        con_classes, ce_classes = torch.cat(con_classes), torch.cat(ce_classes)
        assert set(labels.tolist()) <= set(con_classes.tolist()), "every positive is a Con candidate"
        assert not torch.equal(con_classes[: ce_classes.numel()], ce_classes), "a stream of its own"
        for rate, classes in ((0.5, con_classes), (1.0, torch.arange(C))):
            emb = x.clone().requires_grad_()
            want = ref.contrastive(emb, bank["centers"], valid, tau, labels, classes)
            want.backward()
            for rank, r in enumerate(results):
                got, grad, _ = r[(rate, step)]
                sl = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
                torch.testing.assert_close(got, want.detach(), **TOL, msg=f"rate {rate} step {step} rank {rank}")
                torch.testing.assert_close(grad, emb.grad[sl], **TOL)
        for r in results:  # the CE's sample does not depend on the Con option
            torch.testing.assert_close(r[(0.5, step)][2], r[(1.0, step)][2], rtol=0, atol=0)

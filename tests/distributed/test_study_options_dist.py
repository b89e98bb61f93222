"""The study's controls on sharded state, 2 and 3 gloo ranks vs the single-process head.

1. ``phi_shuffle``: the permutation is global (a class may take the phi of a class on another
   rank), so the sharded head must give the same loss, embedding gradient and margins as one
   process holding every class, over several steps (the bank moving in between).
2. :func:`partial_fc.cluster.offline_refresh` with the data split across ranks gives the bank
   that one process computes from all the data.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from partial_fc import PartialFCHead
from tests.harness import run_distributed

C, D, PER_RANK, STEPS = 11, 8, 4, 3
COMMON = dict(num_classes=C, embedding_size=D, s=16.0, seed=3, phi_percentiles=(0.0, 100.0))
CONFIGS = {
    "s6_both": dict(method="s6", phi_shuffle="both"),
    "s4_margin_none": dict(method="s4", phi_shuffle="margin", phi_count_norm="none"),
    "s2_temperature": dict(method="s2", phi_shuffle="temperature"),
}


def _state():
    g = torch.Generator().manual_seed(7)
    counts = torch.randint(1, 9, (C,), generator=g)
    return {"centers": F.normalize(torch.randn(C, D, generator=g), dim=1), "counts": counts,
            "mean_dist": torch.rand(C, generator=g) + 0.3, "dist_obs": counts.clone()}


def _inputs(world_size: int, step: int):
    g = torch.Generator().manual_seed(100 + step)
    n = world_size * PER_RANK
    return torch.randn(n, D, generator=g), torch.randint(0, C, (n,), generator=g)


def _run(head: PartialFCHead, rank: int, world_size: int) -> list:
    lo, hi = head.class_start, head.class_start + head.num_local_classes
    for k, v in _state().items():
        getattr(head.bank, k).copy_(v[lo:hi])
    out = []
    sl = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    for step in range(STEPS):
        x, y = _inputs(world_size, step)
        e = x[sl].clone().requires_grad_()
        loss = head(e, y[sl])["loss"]
        loss.backward()
        _, _, params = head.class_margins()
        out.append((loss.detach(), e.grad.clone(), params.m2.clone(), lo, hi))
    return out


def _shuffle_worker(rank: int, world_size: int) -> dict:
    return {name: _run(PartialFCHead(**COMMON, **cfg, embedding_grad="exact"), rank, world_size)
            for name, cfg in CONFIGS.items()}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world_size", [2, 3])
def test_shuffle_sharded_equals_single_process(world_size, tmp_path):
    results = run_distributed(_shuffle_worker, world_size, tmp_path)
    for name, cfg in CONFIGS.items():
        head = PartialFCHead(**COMMON, **cfg, embedding_grad="exact")
        # The dense reference sees the whole global batch; per-rank embedding gradients are its rows.
        lo_hi = []
        for k, v in _state().items():
            getattr(head.bank, k).copy_(v)
        for step in range(STEPS):
            x, y = _inputs(world_size, step)
            e = x.clone().requires_grad_()
            loss = head(e, y)["loss"]
            loss.backward()
            _, _, params = head.class_margins()
            for rank in range(world_size):
                r_loss, r_grad, r_m2, lo, hi = results[rank][name][step]
                torch.testing.assert_close(r_loss, loss.detach(), rtol=1e-5, atol=1e-6, msg=f"{name} step {step}")
                torch.testing.assert_close(r_grad, e.grad[rank * PER_RANK:(rank + 1) * PER_RANK],
                                           rtol=1e-5, atol=1e-6, msg=f"{name} step {step} rank {rank}")
                torch.testing.assert_close(r_m2, params.m2[lo:hi], msg=f"{name} margins step {step}")
                lo_hi.append((lo, hi))
        assert lo_hi[0][1] - lo_hi[0][0] < C  # really sharded


def _refresh_worker(rank: int, world_size: int) -> dict:
    from partial_fc.cluster import offline_refresh

    head = PartialFCHead(**COMMON, method="s6", phi_refresh="offline")
    feats, labels = _refresh_data()
    mine = torch.arange(rank, feats.shape[0], world_size)  # an uneven, interleaved share of the data
    offline_refresh(head.bank, head.class_start, C, [(feats[mine[:5]], labels[mine[:5]]),
                                                     (feats[mine[5:]], labels[mine[5:]])], head.ctx)
    return {"start": head.class_start, "bank": {k: v.clone() for k, v in head.bank.state_dict().items()}}


def _refresh_data():
    g = torch.Generator().manual_seed(11)
    return torch.randn(29, D, generator=g), torch.randint(0, C, (29,), generator=g)


@pytest.mark.timeout(120)
def test_offline_refresh_sharded_equals_single_process(tmp_path):
    from partial_fc.cluster import offline_refresh

    results = run_distributed(_refresh_worker, 2, tmp_path)
    head = PartialFCHead(**COMMON, method="s6", phi_refresh="offline")
    feats, labels = _refresh_data()
    offline_refresh(head.bank, 0, C, [(feats, labels)], head.ctx)
    dense = head.bank.state_dict()
    for r in results:
        n = r["bank"]["centers"].shape[0]
        for k, v in r["bank"].items():
            torch.testing.assert_close(v, dense[k][r["start"]:r["start"] + n], rtol=1e-6, atol=1e-6, msg=k)


def _unfilled_worker(rank: int, world_size: int) -> str:
    head = PartialFCHead(**COMMON, method="s6", phi_refresh="offline")
    x, y = _inputs(world_size, 0)
    try:
        head(x[rank * PER_RANK:(rank + 1) * PER_RANK], y[rank * PER_RANK:(rank + 1) * PER_RANK])
    except RuntimeError as e:
        return str(e)
    return "no error"


@pytest.mark.timeout(120)
def test_offline_head_without_refresh_raises_on_every_rank(tmp_path):
    """Every rank raises (none is left waiting in a collective) when no refresh pass ran."""
    for msg in run_distributed(_unfilled_worker, 2, tmp_path, timeout=90):
        assert "offline_refresh" in msg

"""Sharded head vs a single-process dense reference: loss, embedding, head-shard and backbone
gradients (DDP in the loop), bank update, for world sizes 1, 2 and 3 (3 gives uneven shards).

Each spawn runs several head configurations to keep CI short; the dense reference is computed in
the test process from the same seeded inputs.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from partial_fc import PartialFCHead, init_class_centers
from partial_fc.sharding import ClassPartition, sample_classes, step_seed
from tests import reference as ref
from tests.harness import run_distributed

NUM_CLASSES = 11
DIM = 8
IN_DIM = 6
PER_RANK = 4
TOL = dict(rtol=1e-5, atol=1e-5)

CONFIGS = {
    "arcface_exact": dict(method="arcface", embedding_grad="exact"),
    "arcface_st": dict(method="arcface", margin_grad="straight_through"),
    "cosface": dict(method="cosface"),
    "combined": dict(method="combined", m1=0.9, m2=0.4, m3=0.15),
    "s6": dict(method="s6", phi_percentiles=(0.0, 100.0)),
    "s6_looser_smaller": dict(method="s6", phi_percentiles=(0.0, 100.0), margin_direction="looser_smaller",
                              margin_warmup_unseen=False),
    "s2_fixed": dict(method="s2", temperature="fixed"),
    "s2_learnable": dict(method="s2", temperature="learnable", embedding_grad="exact"),
    "s6_center": dict(method="s6_center", phi_percentiles=(0.0, 100.0)),
    "s6_triplet": dict(method="s6_triplet", phi_percentiles=(0.0, 100.0), triplet_margin=0.3),
}
COMMON = dict(num_classes=NUM_CLASSES, embedding_size=DIM, s=16.0, seed=3)


def _close_w_grad(got: torch.Tensor, want: torch.Tensor, msg: str = "") -> None:
    """W gradients scale like 1/|w| (~100 at init_std 0.01), so an absolute 1e-5 would ask for
    1e-7 relative accuracy, below fp32 resolution; the fused kernel orders its sums differently
    from autograd's chain, so the absolute tolerance is taken relative to the gradient's scale."""
    atol = TOL["atol"] * max(1.0, float(want.abs().max()))
    torch.testing.assert_close(got, want, rtol=TOL["rtol"], atol=atol, msg=msg)


def _backbone(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN_DIM, 16), nn.Tanh(), nn.Linear(16, DIM))


def _batch(world_size: int, seed: int):
    g = torch.Generator().manual_seed(1000 + seed)
    n = world_size * PER_RANK
    x = torch.randn(n, IN_DIM, generator=g)
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    return x, labels


def _bank_state(seed: int):
    """A dense bank with some classes unseen, some with a center but no phi, the rest complete."""
    g = torch.Generator().manual_seed(2000 + seed)
    centers = F.normalize(torch.randn(NUM_CLASSES, DIM, generator=g), dim=1)
    counts = torch.randint(1, 9, (NUM_CLASSES,), generator=g)
    counts[[1, 6]] = 0
    centers[counts == 0] = 0
    dist_obs = counts.clone()
    dist_obs[[4]] = 0
    mean_dist = torch.rand(NUM_CLASSES, generator=g) + 0.3
    mean_dist[dist_obs == 0] = 0
    return {"centers": centers, "counts": counts, "mean_dist": mean_dist, "dist_obs": dist_obs}


def _load_bank(head: PartialFCHead, state) -> None:
    lo, hi = head.class_start, head.class_start + head.num_local_classes
    for key, value in state.items():
        getattr(head.bank, key).copy_(value[lo:hi])


def _small_chunks() -> None:
    """Column chunks of 2 classes in the fused kernels (this spawned process only), so the
    parity tests cover the chunked forward and backward on every shard size."""
    import partial_fc.fused

    partial_fc.fused._CHUNK = 2


def _parity_worker(rank: int, world_size: int, names: list[str]) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    _small_chunks()

    results = {}
    for name in names:
        head = PartialFCHead(**COMMON, **CONFIGS[name])
        if head.bank is not None:
            _load_bank(head, _bank_state(0))
        model = DDP(_backbone(0))
        x, labels = _batch(world_size, 0)
        sl = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        emb = model(x[sl])
        emb.retain_grad()
        out = head(emb, labels[sl])
        out["loss"].backward()
        r = {k: v.detach() for k, v in out.items()}
        r.update(
            emb_grad=emb.grad.clone(),
            w_grad=head.weight.grad.clone(),
            backbone_grads=[p.grad.clone() for p in model.parameters()],
            start=head.class_start,
        )
        if head.log_tau is not None:
            r["log_tau_grad"] = head.log_tau.grad.clone()
        if head.bank is not None:
            r["bank"] = {k: v.clone() for k, v in head.bank.state_dict().items()}
        results[name] = r
    return results


def _dense(name: str, world_size: int) -> dict:
    cfg = {**COMMON, **CONFIGS[name]}
    method = cfg["method"]
    x, labels = _batch(world_size, 0)
    backbone = _backbone(0)
    emb = backbone(x)
    emb.retain_grad()
    weight = init_class_centers(0, NUM_CLASSES, DIM, 0.01, cfg["seed"]).requires_grad_()
    s = cfg["s"]
    state = _bank_state(0)
    ph = ref.phi(state).float()
    known = ph[~torch.isnan(ph)]
    lo, hi = float(known.min()), float(known.max())
    grad_mode = cfg.get("margin_grad", "exact")
    if method == "cosface":
        m1, m2, m3 = 1.0, 0.0, 0.4
    elif method == "combined":
        m1, m2, m3 = cfg["m1"], cfg["m2"], cfg["m3"]
    elif method in ("s6", "s6_center", "s6_triplet", "s6_looser_smaller"):
        lam = (ph[labels] - lo) / (hi - lo)
        if cfg.get("margin_direction") == "looser_smaller":
            lam = 1 - lam
        m = 0.4 + lam * 0.2
        unknown = torch.isnan(ph[labels])
        if cfg.get("margin_warmup_unseen", True):
            m = torch.where(unknown, torch.full_like(m, 0.5), m)
        else:
            m = torch.where(unknown, torch.full_like(m, 0.6 if "margin_direction" not in cfg else 0.4), m)
        m1, m2, m3 = 1.0, m, 0.0
    else:
        m1, m2, m3 = 1.0, 0.5, 0.0
    ce = ref.margin_ce(emb, weight, labels, m1, m2, m3, s, grad_mode)
    valid = state["counts"] > 0
    con = torch.zeros(())
    ali = torch.zeros(())
    log_tau = None
    all_classes = torch.arange(NUM_CLASSES)
    if method.startswith("s2") or method in ("s6", "s6_looser_smaller"):
        temp = cfg.get("temperature", "adaptive")
        if temp == "adaptive":
            p = torch.where(torch.isnan(ph), torch.full_like(ph, hi), ph)
            tau = 0.1 * (p.clamp(lo, hi) / known.clamp(lo, hi).mean()).clamp(0.25, 4.0)
        elif temp == "fixed":
            tau = torch.full((NUM_CLASSES,), 0.1)
        else:
            log_tau = torch.tensor(math.log(0.1), requires_grad=True)
            tau = log_tau.exp().expand(NUM_CLASSES)
        con = ref.contrastive(emb, state["centers"], valid, tau, labels, all_classes)
    elif method == "s6_center":
        con = ref.center(emb, state["centers"], valid, labels)
    elif method == "s6_triplet":
        con = ref.triplet(emb, state["centers"], valid, labels, all_classes, cfg["triplet_margin"])
    if method.startswith("s6"):
        ali = ref.aligning(weight, state["centers"], valid, labels)
    loss = ce + con + ali
    loss.backward()
    bank = ref.bank_update({k: v.clone() for k, v in state.items()}, emb.detach(), labels)
    return dict(
        loss=loss.detach(), ce=ce.detach(), con=con.detach(), ali=ali.detach(), emb_grad=emb.grad,
        w_grad=weight.grad, backbone_grads=[p.grad for p in backbone.parameters()], bank=bank,
        log_tau_grad=None if log_tau is None else log_tau.grad,
    )


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_head_matches_dense_reference(world_size, tmp_path):
    names = list(CONFIGS)
    results = run_distributed(_parity_worker, world_size, tmp_path, names=names)
    part = ClassPartition(NUM_CLASSES, world_size)
    for name in names:
        dense = _dense(name, world_size)
        exact = CONFIGS[name].get("embedding_grad") == "exact"
        for rank, res in enumerate(results):
            r = res[name]
            msg = f"{name} rank {rank}/{world_size}"
            for key in ("loss", "ce", "con", "ali"):
                torch.testing.assert_close(r[key], dense[key], **TOL, msg=f"{msg} {key}")
            sl = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
            scale = 1.0 if exact else float(world_size)
            torch.testing.assert_close(r["emb_grad"], dense["emb_grad"][sl] * scale, **TOL, msg=f"{msg} emb grad")
            lo, hi = part.range(rank)
            assert r["start"] == lo
            _close_w_grad(r["w_grad"], dense["w_grad"][lo:hi], msg=f"{msg} W grad")
            if not exact:  # DDP averages; the head's world-size scaling makes it the dense gradient
                for got, want in zip(r["backbone_grads"], dense["backbone_grads"]):
                    torch.testing.assert_close(got, want, **TOL, msg=f"{msg} backbone grad")
            if dense["log_tau_grad"] is not None:
                torch.testing.assert_close(r["log_tau_grad"], dense["log_tau_grad"], **TOL, msg=f"{msg} tau")
            if "bank" in r:
                for key in ("centers", "counts", "mean_dist", "dist_obs"):
                    torch.testing.assert_close(r["bank"][key], dense["bank"][key][lo:hi], **TOL, msg=f"{msg} {key}")


# --- sample_rate < 1: sparse gradient and the lazy row update ---------------------------------------
SAMPLED = dict(num_classes=40, embedding_size=DIM, s=16.0, seed=5, sample_rate=0.3, method="arcface")
LR, MOM, WD = 0.5, 0.9, 0.05  # a large weight decay so a wrong touch of unsampled rows is visible


def _sampled_batch(world_size: int, step: int):
    g = torch.Generator().manual_seed(77 + step)
    x = torch.randn(world_size * PER_RANK, IN_DIM, generator=g)
    labels = torch.randint(0, 40, (world_size * PER_RANK,), generator=g)
    return x, labels


def _sampled_worker(rank: int, world_size: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from partial_fc.optim import SparseRowSGD

    _small_chunks()
    torch.manual_seed(0)
    model = DDP(_backbone(1))
    heads = {mode: PartialFCHead(**SAMPLED, row_update=mode) for mode in ("lazy", "dense")}
    opts = {"lazy": SparseRowSGD([heads["lazy"].weight], lr=LR, momentum=MOM, weight_decay=WD),
            "dense": torch.optim.SGD([heads["dense"].weight], lr=LR, momentum=MOM, weight_decay=WD)}
    sl = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    out = {}
    for step in range(2):
        x, labels = _sampled_batch(world_size, step)
        for mode, head in heads.items():
            model.zero_grad(set_to_none=True)
            res = head(model(x[sl]), labels[sl])
            res["loss"].backward()
            g = head.weight.grad
            rec = dict(loss=res["loss"].detach(), sparse=g.is_sparse, nnz=g.coalesce().values().shape[0] if g.is_sparse else -1,
                       w_grad=g.to_dense().clone(), backbone_grads=[p.grad.clone() for p in model.parameters()])
            opts[mode].step()
            opts[mode].zero_grad(set_to_none=True)
            rec["w_after"] = head.weight.detach().clone()
            out[(mode, step)] = rec
    out["momentum"] = opts["lazy"].state[heads["lazy"].weight]["momentum_buffer"].clone()
    return out


@pytest.mark.parametrize("world_size", [2, 3])
def test_sampled_head_sparse_update_matches_dense_reference(world_size, tmp_path):
    """Sampled rows: gradient and lazy momentum-SGD update equal a dense single-process reference;
    unsampled rows: untouched (no decay, no momentum); the gradient is row-sparse with K rows.
    Three ranks give uneven shards (14, 13, 13)."""
    results = run_distributed(_sampled_worker, world_size, tmp_path)
    part = ClassPartition(40, world_size)
    weight = init_class_centers(0, 40, DIM, 0.01, 5)
    buf = torch.zeros_like(weight)
    backbone = _backbone(1)
    for step in range(2):
        x, labels = _sampled_batch(world_size, step)
        sampled_global, counts = [], []
        for rank in range(world_size):
            lo, _ = part.range(rank)
            gen = torch.Generator().manual_seed(step_seed(5, step, rank))
            smp = sample_classes(labels, lo, part.size(rank), 0.3, gen)
            assert smp.num_sampled == math.ceil(0.3 * part.size(rank))
            sampled_global.append(smp.index + lo)
            counts.append(smp.num_sampled)
        classes = torch.cat(sampled_global)
        assert set(labels.tolist()) <= set(classes.tolist()), "every positive is sampled on its owner"
        backbone.zero_grad(set_to_none=True)
        w = weight.clone().requires_grad_()
        remap = {int(c): i for i, c in enumerate(classes.tolist())}
        target = torch.tensor([remap[int(y)] for y in labels])
        loss = ref.margin_ce(backbone(x), w[classes], target, 1.0, 0.5, 0.0, 16.0)
        loss.backward()
        # The lazy rule, written densely with a row mask: only sampled rows move.
        mask = torch.zeros(40, 1, dtype=torch.bool)
        mask[classes] = True
        g = w.grad + WD * weight
        new_buf = torch.where(mask, MOM * buf + g, buf)
        new_weight = torch.where(mask, weight - LR * new_buf, weight)
        for rank, r in enumerate(results):
            lo, hi = part.range(rank)
            lazy, dense = r[("lazy", step)], r[("dense", step)]
            assert lazy["sparse"] and lazy["nnz"] == counts[rank], "a row-sparse gradient of the K sampled rows"
            assert not dense["sparse"]
            torch.testing.assert_close(lazy["loss"], loss.detach(), **TOL)
            _close_w_grad(lazy["w_grad"], w.grad[lo:hi])
            for got, want in zip(lazy["backbone_grads"], [p.grad for p in backbone.parameters()]):
                torch.testing.assert_close(got, want, **TOL)
            _close_w_grad(lazy["w_after"], new_weight[lo:hi])
            unsampled = ~mask[lo:hi, 0]
            assert unsampled.any()
            before = init_class_centers(0, 40, DIM, 0.01, 5)[lo:hi] if step == 0 else r[("lazy", step - 1)]["w_after"]
            assert torch.equal(lazy["w_after"][unsampled], before[unsampled]), "unsampled rows untouched (bit for bit)"
            if step == 0:  # same W: the two modes agree on the gradient and on the sampled rows
                _close_w_grad(dense["w_grad"], lazy["w_grad"])
                torch.testing.assert_close(dense["w_after"][~unsampled], lazy["w_after"][~unsampled], **TOL)
                # ...but the dense optimizer decays every row (the documented difference).
                assert not torch.equal(dense["w_after"][unsampled], weight[lo:hi][unsampled])
        weight, buf = new_weight, new_buf
    for rank, r in enumerate(results):
        lo, hi = part.range(rank)
        _close_w_grad(r["momentum"], buf[lo:hi])


# --- the distributed head equals the single-process head with percentile clipping ------------------
def _percentile_worker(rank: int, world_size: int) -> dict:
    head = PartialFCHead(num_classes=30, embedding_size=DIM, method="s6", s=16.0, seed=1)
    g = torch.Generator().manual_seed(9)
    out = {}
    for step in range(4):
        x = torch.randn(world_size * 6, DIM, generator=g)
        labels = torch.randint(0, 30, (world_size * 6,), generator=g)
        sl = slice(rank * 6, (rank + 1) * 6)
        emb = x[sl].clone().requires_grad_()
        res = head(emb, labels[sl])
        res["loss"].backward()
        out[step] = (res["loss"].detach(), emb.grad.clone())
    out["stats"] = head.last_stats
    return out


def test_multi_step_s6_distributed_equals_single_process(tmp_path):
    dist_res = run_distributed(_percentile_worker, 2, tmp_path)
    single = PartialFCHead(num_classes=30, embedding_size=DIM, method="s6", s=16.0, seed=1)
    g = torch.Generator().manual_seed(9)
    for step in range(4):
        x = torch.randn(12, DIM, generator=g, requires_grad=True)
        labels = torch.randint(0, 30, (12,), generator=g)
        res = single(x, labels)
        res["loss"].backward()
        for rank, r in enumerate(dist_res):
            loss, grad = r[step]
            torch.testing.assert_close(loss, res["loss"].detach(), **TOL)
            torch.testing.assert_close(grad, x.grad[rank * 6:(rank + 1) * 6] * 2, **TOL)
    for r in dist_res:
        for key in ("phi_lo", "phi_hi", "phi_min", "phi_max", "phi_mean"):  # global stats only
            assert r["stats"][key] == pytest.approx(single.last_stats[key], rel=1e-5)


# --- bad input: every rank raises the same clear error, nobody hangs -------------------------------
def _bad_input_worker(rank: int, world_size: int) -> dict:
    head = PartialFCHead(num_classes=10, embedding_size=DIM, method="s6")
    msgs = {}

    def attempt(key, emb, labels):
        try:
            head(emb, labels)
            msgs[key] = None
        except (ValueError, FloatingPointError) as e:
            msgs[key] = f"{type(e).__name__}: {e}"

    attempt("batch", torch.randn(4 if rank == 0 else 3, DIM), torch.zeros(4 if rank == 0 else 3, dtype=torch.long))
    attempt("label", torch.randn(4, DIM), torch.tensor([0, 1, 2, 10 if rank == 1 else 3]))
    attempt("negative", torch.randn(4, DIM), torch.tensor([0, -1, 2, 3]) if rank == 0 else torch.zeros(4, dtype=torch.long))
    emb = torch.randn(4, DIM)
    if rank == 0:
        emb[2, 1] = float("nan")
    attempt("nan", emb, torch.zeros(4, dtype=torch.long))
    attempt("ok", torch.randn(4, DIM), torch.zeros(4, dtype=torch.long))  # the group still works
    return msgs


def test_bad_input_raises_on_every_rank(tmp_path):
    results = run_distributed(_bad_input_worker, 2, tmp_path, timeout=90)
    for rank, msgs in enumerate(results):
        assert "unequal batch sizes across ranks [4, 3]" in msgs["batch"], msgs
        assert "label 10 on rank 1" in msgs["label"] and "outside [0, 10)" in msgs["label"]
        assert "label -1 on rank 0" in msgs["negative"]
        assert msgs["nan"].startswith("FloatingPointError") and "rank(s) [0]" in msgs["nan"]
        assert msgs["ok"] is None

"""Row optimizers (lazy SGD / AdamW on row-sparse gradients) and the fused margin softmax CE."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from partial_fc import PartialFCHead
from partial_fc.distributed import ParallelContext
from partial_fc.fused import fused_margin_cross_entropy
from partial_fc.losses import distributed_cross_entropy
from partial_fc.margins import MarginParams, apply_margin
from partial_fc.optim import SparseRowAdamW, SparseRowSGD
from train.optimizer_setup import build_optimizer, global_grad_norm

C, D = 12, 5


def _sparse(rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return torch.sparse_coo_tensor(rows.unsqueeze(0), values, (C, D), check_invariants=True)


def _grads(steps: int, rows_per_step):
    g = torch.Generator().manual_seed(4)
    return [(rows, torch.randn(len(rows), D, generator=g)) for rows in rows_per_step[:steps]]


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_all_rows_sampled_equals_torch(kind):
    """When every row is in the sparse gradient, the lazy optimizer is torch's optimizer."""
    w0 = torch.randn(C, D, generator=torch.Generator().manual_seed(1))
    a, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    if kind == "sgd":
        ours, theirs = SparseRowSGD([a], lr=0.3, momentum=0.9, weight_decay=0.01), torch.optim.SGD(
            [b], lr=0.3, momentum=0.9, weight_decay=0.01)
    else:
        ours, theirs = SparseRowAdamW([a], lr=0.05, weight_decay=0.1), torch.optim.AdamW([b], lr=0.05, weight_decay=0.1)
    perm = torch.randperm(C, generator=torch.Generator().manual_seed(2))
    for rows, vals in _grads(3, [perm, perm.flip(0), torch.arange(C)]):
        a.grad = _sparse(rows, vals)
        dense = torch.zeros(C, D)
        dense[rows] = vals
        b.grad = dense
        ours.step()
        theirs.step()
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("chunk", [16384, 1])
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_unsampled_rows_and_state_untouched(kind, chunk, monkeypatch):
    monkeypatch.setattr("partial_fc.optim._CHUNK", chunk)  # 1: every row its own chunk
    w0 = torch.randn(C, D, generator=torch.Generator().manual_seed(1))
    p = torch.nn.Parameter(w0.clone())
    opt = SparseRowSGD([p], lr=0.3, momentum=0.9, weight_decay=0.5) if kind == "sgd" else SparseRowAdamW([p], lr=0.05)
    steps = _grads(3, [torch.tensor([1, 4, 7]), torch.tensor([4, 9]), torch.tensor([0, 1])])
    # Dense emulation of the lazy rule, row mask by row mask.
    w, buf, m, v = w0.clone(), torch.zeros(C, D), torch.zeros(C, D), torch.zeros(C, D)
    for t, (rows, vals) in enumerate(steps, start=1):
        before = {k: s.clone() for k, s in opt.state[p].items()} if opt.state[p] else {}
        w_before = p.detach().clone()
        p.grad = _sparse(rows, vals)
        opt.step()
        mask = torch.zeros(C, 1, dtype=torch.bool)
        mask[rows] = True
        g = torch.zeros(C, D)
        g[rows] = vals
        if kind == "sgd":
            buf = torch.where(mask, 0.9 * buf + g + 0.5 * w, buf)
            w = torch.where(mask, w - 0.3 * buf, w)
        else:
            m = torch.where(mask, 0.9 * m + 0.1 * g, m)
            v = torch.where(mask, 0.999 * v + 0.001 * g * g, v)
            upd = (1 - 0.05 * 1e-2) * w - 0.05 * (m / (1 - 0.9**t)) / ((v / (1 - 0.999**t)).sqrt() + 1e-8)
            w = torch.where(mask, upd, w)
        torch.testing.assert_close(p.detach(), w, rtol=1e-6, atol=1e-6)
        keep = ~mask[:, 0]
        assert torch.equal(p.detach()[keep], w_before[keep]), "unsampled rows bit-for-bit unchanged"
        for key, old in before.items():
            if old.dim() == 2:
                assert torch.equal(opt.state[p][key][keep], old[keep]), f"{key} of unsampled rows frozen"


def test_accumulated_sparse_gradients_are_summed():
    """Gradient accumulation concatenates sparse gradients; a repeated row gets its summed gradient."""
    w0 = torch.randn(C, D)
    a, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    for idx in (torch.tensor([1, 2, 3]), torch.tensor([3, 5])):
        F.embedding(idx, a, sparse=True).pow(2).sum().backward()
        b[idx].pow(2).sum().backward()
    assert a.grad.is_sparse and not a.grad.is_coalesced()
    ctx = ParallelContext()
    torch.testing.assert_close(global_grad_norm([], [a], ctx, torch.device("cpu")),
                               global_grad_norm([], [b], ctx, torch.device("cpu")))
    SparseRowSGD([a], lr=0.1, momentum=0.9).step()
    torch.optim.SGD([b], lr=0.1, momentum=0.9).step()
    torch.testing.assert_close(a.detach(), b.detach())


def test_build_optimizer_rows_and_errors():
    p = torch.nn.Parameter(torch.zeros(3, 2))
    assert isinstance(build_optimizer("sgd", [{"params": [p]}], 0.1, rows="lazy"), SparseRowSGD)
    assert isinstance(build_optimizer("adamw", [{"params": [p]}], 0.1, rows="lazy"), SparseRowAdamW)
    assert type(build_optimizer("sgd", [{"params": [p]}], 0.1)) is torch.optim.SGD
    with pytest.raises(ValueError, match="row update"):
        build_optimizer("sgd", [{"params": [p]}], 0.1, rows="sparse")
    with pytest.raises(ValueError, match="momentum"):
        SparseRowSGD([p], lr=0.1, momentum=1.5)
    with pytest.raises(ValueError, match="betas"):
        SparseRowAdamW([p], lr=0.1, betas=(0.9, 1.0))


# --- fused margin softmax cross-entropy -----------------------------------------------------------
@pytest.mark.parametrize("margin,grad_mode", [((1.0, 0.5, 0.0), "exact"), ((1.0, 0.5, 0.0), "straight_through"),
                                              ((1.0, 0.0, 0.4), "exact"), ((0.9, 0.4, 0.15), "exact")])
@pytest.mark.parametrize("chunk", [8192, 4])
def test_fused_equals_unfused_chain(margin, grad_mode, chunk, monkeypatch):
    monkeypatch.setattr("partial_fc.fused._CHUNK", chunk)  # 4: the 14 rows in 4 backward chunks
    g = torch.Generator().manual_seed(3)
    n, k = 9, 14
    emb = torch.randn(n, D, generator=g, requires_grad=True)
    w = (torch.randn(k, D, generator=g) * 0.01).requires_grad_()
    target = torch.randint(-1, k, (n,), generator=g)  # -1: class held by another rank
    rows = torch.nonzero(target >= 0).squeeze(1)
    cols = target[rows]
    params = MarginParams(*(torch.full((rows.numel(),), x) for x in margin))
    ctx = ParallelContext()
    feats = F.normalize(emb, dim=1)
    fused = fused_margin_cross_entropy(feats, w, rows, cols, params, grad_mode, 32.0, ctx)
    fused.backward()
    got = (emb.grad.clone(), w.grad.clone())
    emb.grad, w.grad = None, None
    cos = (F.normalize(emb, dim=1) @ F.normalize(w, dim=1).t()).clamp(-1, 1)
    logits = cos.index_put((rows, cols), apply_margin(cos[rows, cols], params, grad_mode)) * 32.0
    want = distributed_cross_entropy(logits, target, ctx)
    want.backward()
    torch.testing.assert_close(fused, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[0], emb.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[1], w.grad, rtol=1e-4, atol=1e-5 * float(w.grad.abs().max()))


@pytest.mark.parametrize("chunk", [3, 5, 64])
@pytest.mark.parametrize("sparse", [True, False])
def test_fused_gathers_indexed_rows_in_chunks(chunk, sparse, monkeypatch):
    # The index path gathers W's rows chunk by chunk in forward and backward; its gradient lands on
    # exactly the indexed rows (row-sparse or dense with zeros elsewhere), whatever the chunking.
    monkeypatch.setattr("partial_fc.fused._CHUNK", chunk)
    g = torch.Generator().manual_seed(11)
    n, c = 7, 23
    index = torch.tensor([0, 2, 3, 7, 8, 9, 12, 15, 16, 19, 22])
    k = index.numel()
    emb = torch.randn(n, D, generator=g, requires_grad=True)
    w = (torch.randn(c, D, generator=g) * 0.02).requires_grad_()
    target = torch.tensor([0, 10, -1, 4, 5, -1, 9])  # columns among the K indexed rows
    rows = torch.nonzero(target >= 0).squeeze(1)
    cols = target[rows]
    params = MarginParams(*(torch.full((rows.numel(),), x) for x in (1.0, 0.5, 0.0)))
    ctx = ParallelContext()
    fused = fused_margin_cross_entropy(F.normalize(emb, dim=1), w, rows, cols, params, "exact", 16.0, ctx,
                                       index=index, sparse_grad=sparse)
    fused.backward()
    got_emb = emb.grad.clone()
    got_w = w.grad.to_dense() if sparse else w.grad.clone()
    assert w.grad.is_sparse == sparse
    emb.grad, w.grad = None, None
    cos = (F.normalize(emb, dim=1) @ F.normalize(w[index], dim=1).t()).clamp(-1, 1)
    logits = cos.index_put((rows, cols), apply_margin(cos[rows, cols], params, "exact")) * 16.0
    want = distributed_cross_entropy(logits, target, ctx)
    want.backward()
    torch.testing.assert_close(fused, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_emb, emb.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_w, w.grad, rtol=1e-4, atol=1e-5 * float(w.grad.abs().max()))
    untouched = torch.ones(c, dtype=torch.bool)
    untouched[index] = False
    assert not got_w[untouched].any()


@pytest.mark.parametrize("chunk", [8192, 3])
def test_fused_zero_gradient_where_cosine_leaves_unit_interval(chunk, monkeypatch):
    # Features longer than 1 (the kernel does not require unit rows) push some raw cosines past
    # +-1: clamp gives those positions a zero gradient, in the fused kernel as in the chain.
    monkeypatch.setattr("partial_fc.fused._CHUNK", chunk)
    g = torch.Generator().manual_seed(21)
    n, k = 6, 10
    w = (torch.randn(k, D, generator=g) * 0.02).requires_grad_()
    base = torch.randn(n, D, generator=g)
    base[:3] = w.detach()[[1, 4, 7]]
    feats = (F.normalize(base, dim=1) * torch.tensor([3.0, -2.0, 1.5, 1.0, 1.0, 1.0]).unsqueeze(1)).requires_grad_()
    target = torch.tensor([-1, -1, -1, 0, 5, 9])
    rows = torch.nonzero(target >= 0).squeeze(1)
    cols = target[rows]
    params = MarginParams(*(torch.full((rows.numel(),), x) for x in (1.0, 0.5, 0.0)))
    ctx = ParallelContext()
    fused = fused_margin_cross_entropy(feats, w, rows, cols, params, "exact", 8.0, ctx)
    fused.backward()
    got = (feats.grad.clone(), w.grad.clone())
    feats.grad, w.grad = None, None
    raw = feats @ F.normalize(w, dim=1).t()
    assert (raw.detach().abs() > 1).sum() >= 3
    cos = raw.clamp(-1, 1)
    logits = cos.index_put((rows, cols), apply_margin(cos[rows, cols], params, "exact")) * 8.0
    want = distributed_cross_entropy(logits, target, ctx)
    want.backward()
    torch.testing.assert_close(fused, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[0], feats.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[1], w.grad, rtol=1e-4, atol=1e-5 * float(w.grad.abs().max()))


def test_fused_backward_runs_once_and_checks_shapes():
    feats = F.normalize(torch.randn(3, D), dim=1).requires_grad_()
    w = torch.randn(4, D, requires_grad=True)
    params = MarginParams(torch.ones(1), torch.full((1,), 0.5), torch.zeros(1))
    loss = fused_margin_cross_entropy(feats, w, torch.tensor([0]), torch.tensor([2]), params, "exact", 8.0, ParallelContext())
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()
    with pytest.raises(ValueError, match="share D"):
        fused_margin_cross_entropy(feats, torch.randn(4, D + 1), torch.tensor([0]), torch.tensor([2]), params,
                                   "exact", 8.0, ParallelContext())


def test_head_lazy_and_dense_row_update_agree():
    opts = dict(num_classes=50, embedding_size=D, sample_rate=0.2, method="s6", s=16.0, seed=2)
    heads = {m: PartialFCHead(**opts, row_update=m) for m in ("lazy", "dense")}
    emb = torch.randn(8, D, generator=torch.Generator().manual_seed(5))
    labels = torch.randint(0, 50, (8,), generator=torch.Generator().manual_seed(6))
    out = {}
    for mode, head in heads.items():
        res = head(emb.clone().requires_grad_(), labels)
        res["loss"].backward()
        out[mode] = (res["loss"].detach(), head.weight.grad)
    assert out["lazy"][1].is_sparse and not out["dense"][1].is_sparse
    rows, _ = out["lazy"][1].coalesce().indices()[0], None
    assert rows.numel() == max(10, labels.unique().numel())  # K = ceil(0.2 * 50), positives included
    torch.testing.assert_close(out["lazy"][0], out["dense"][0])
    torch.testing.assert_close(out["lazy"][1].to_dense(), out["dense"][1])
    with pytest.raises(ValueError, match="row_update"):
        PartialFCHead(**opts, row_update="sparse")


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_row_optimizer_state_round_trips_through_a_checkpoint(kind, tmp_path):
    """Lazy optimizer state (shard-shaped buffers + AdamW's step) saves and loads row for row."""
    from train.checkpoint import load_checkpoint, save_checkpoint

    def job():
        head = PartialFCHead(num_classes=30, embedding_size=D, sample_rate=0.3, method="arcface", seed=1)
        opt = build_optimizer(kind, [{"params": [head.weight]}], 0.1, rows="lazy")
        return head, opt

    head, opt = job()
    g = torch.Generator().manual_seed(8)
    for _ in range(2):
        head(torch.randn(6, D, generator=g), torch.randint(0, 30, (6,), generator=g))["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    path = save_checkpoint(tmp_path, 2, head, opt, backbone=torch.nn.Linear(2, 2))
    head2, opt2 = job()
    load_checkpoint(path, head2, opt2, backbone=torch.nn.Linear(2, 2))
    assert torch.equal(head2.weight, head.weight)
    for key, value in opt.state[head.weight].items():
        assert torch.equal(opt2.state[head2.weight][key], value), key

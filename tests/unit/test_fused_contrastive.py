"""The fused cluster contrastive loss against the unfused chain it replaces, in one process.

The reference is the unfused computation the head used before: ``(F @ C[index].T) / tau``, ``-inf``
for invalid centers, :func:`partial_fc.losses.distributed_cross_entropy` with the sample mask.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from partial_fc.distributed import ParallelContext
from partial_fc.fused_contrastive import fused_cluster_contrastive
from partial_fc.losses import distributed_cross_entropy

TOL = dict(rtol=1e-5, atol=1e-5)


def unfused(feats, centers, target, tau, valid, ctx, sample_mask=None, index=None):
    """The head's former Con branch (the reference; autograd through every [N, K] buffer)."""
    c = centers if index is None else centers[index]
    logits = (feats @ c.t()) / tau
    logits = logits.masked_fill(~valid.unsqueeze(0), -torch.inf)
    return distributed_cross_entropy(logits, target, ctx, sample_mask)


def problem(n=10, c=23, d=6, k=17, seed=0, invalid=(2, 5, 11)):
    g = torch.Generator().manual_seed(seed)
    feats = F.normalize(torch.randn(n, d, generator=g), dim=1)
    centers = F.normalize(torch.randn(c, d, generator=g), dim=1)
    index = torch.randperm(c, generator=g)[:k].sort().values
    valid = torch.ones(k, dtype=torch.bool)
    valid[list(invalid)] = False
    target = torch.randint(0, k, (n,), generator=g)
    target[::4] = -1  # classes held by "another rank": only their denominators are here
    tau = 0.05 + 0.1 * torch.rand(k, generator=g)
    mask = valid[target.clamp_min(0)] | (target < 0)
    return feats, centers, index, valid, target, tau, mask


def _compare(feats, centers, target, tau, valid, sample_mask, index, chunk, learn_tau=False):
    ctx = ParallelContext.from_group(None)
    f1 = feats.clone().requires_grad_()
    f2 = feats.clone().requires_grad_()
    if learn_tau:
        lt1 = torch.tensor(math.log(0.07), requires_grad=True)
        lt2 = torch.tensor(math.log(0.07), requires_grad=True)
        t1, t2 = lt1.exp(), lt2.exp().expand(valid.shape[0])
    else:
        t1 = t2 = tau
    got = fused_cluster_contrastive(f1, centers, target, t1, valid, ctx, sample_mask, index, chunk=chunk)
    want = unfused(f2, centers, target, t2, valid, ctx, sample_mask, index)
    (got * 1.7).backward()
    (want * 1.7).backward()
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(f1.grad, f2.grad, **TOL)
    if learn_tau:
        torch.testing.assert_close(lt1.grad, lt2.grad, **TOL)
    return got


@pytest.mark.parametrize("chunk", [1, 4, 5, 17, 8192])
def test_matches_unfused_chunks_and_temperatures(chunk):
    """chunk < K, K (17) not a multiple of chunk, chunk == K, chunk > K; per-class and learnable tau."""
    feats, centers, index, valid, target, tau, mask = problem()
    _compare(feats, centers, target, tau, valid, mask, index, chunk)  # adaptive: a [K] tau
    _compare(feats, centers, target, torch.full_like(tau, 0.1), valid, mask, index, chunk)  # fixed
    _compare(feats, centers, target, tau, valid, mask, index, chunk, learn_tau=True)
    _compare(feats, centers[index], target, tau, valid, None, None, chunk)  # no index, no mask


def test_masked_samples_all_invalid_and_empty():
    feats, centers, index, valid, target, tau, mask = problem(seed=1)
    mask[:5] = False
    target[1] = 2  # a masked sample whose own center is invalid: a -inf target logit, no NaN
    _compare(feats, centers, target, tau, valid, mask, index, 3, learn_tau=True)
    # Every sample masked: zero loss and zero gradients, no NaN.
    got = _compare(feats, centers, target, tau, valid, torch.zeros_like(mask), index, 3, learn_tau=True)
    assert float(got.detach()) == 0.0
    # Every center invalid (all samples masked, as the head's mask would say): finite zeros.
    none = torch.zeros_like(valid)
    got = _compare(feats, centers, target, tau, none, torch.zeros_like(mask), index, 4)
    assert float(got.detach()) == 0.0
    # K = 0 on this rank: every target elsewhere; the local contribution is empty.
    empty = torch.zeros(0, dtype=torch.int64)
    f = feats.clone().requires_grad_()
    ctx = ParallelContext.from_group(None)
    out = fused_cluster_contrastive(f, centers, torch.full((10,), -1), torch.zeros(0), torch.zeros(0, dtype=torch.bool),
                                    ctx, torch.ones(10, dtype=torch.bool), empty)
    out.backward()
    # Alone, no center anywhere: log(tiny) - 0, as the unfused chain's clamp gives; no gradient.
    ref = unfused(feats, centers, torch.full((10,), -1), torch.zeros(0), torch.zeros(0, dtype=torch.bool), ctx,
                  torch.ones(10, dtype=torch.bool), empty)
    torch.testing.assert_close(out, ref)
    assert torch.count_nonzero(f.grad) == 0


def test_gradient_is_scaled_by_grad_output_and_backward_repeats():
    feats, centers, index, valid, target, tau, mask = problem(seed=2)
    ctx = ParallelContext.from_group(None)
    f = feats.clone().requires_grad_()
    out = fused_cluster_contrastive(f, centers, target, tau, valid, ctx, mask, index, chunk=4)
    out.backward(torch.tensor(2.0), retain_graph=True)
    g2 = f.grad.clone()
    f.grad = None
    out.backward(torch.tensor(-0.5))
    torch.testing.assert_close(f.grad, g2 * -0.25)
    # The bank changes in place after the loss: backward must not read the centers again.
    f.grad = None
    out = fused_cluster_contrastive(f, centers.clone(), target, tau, valid, ctx, mask, index, chunk=4)
    centers.mul_(0.5)
    out.backward(torch.tensor(2.0))
    torch.testing.assert_close(f.grad, g2)


def test_autocast_bf16_close_to_fp32():
    feats, centers, index, valid, target, tau, mask = problem(n=12, d=16, seed=3)
    ctx = ParallelContext.from_group(None)
    f = feats.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused_cluster_contrastive(f, centers, target, tau, valid, ctx, mask, index, chunk=5)
    out.backward()
    assert out.dtype == torch.float32 and f.grad.dtype == torch.float32
    f2 = feats.clone().requires_grad_()
    want = unfused(f2, centers, target, tau, valid, ctx, mask, index)
    want.backward()
    # bf16 similarities divided by tau ~0.1: logits carry ~1e-2 absolute error.
    torch.testing.assert_close(out, want, rtol=0.05, atol=0.05)
    torch.testing.assert_close(f.grad, f2.grad, rtol=0.1, atol=0.05)


def test_bad_input_errors():
    feats, centers, index, valid, target, tau, mask = problem()
    ctx = ParallelContext.from_group(None)
    with pytest.raises(ValueError, match="must share D"):
        fused_cluster_contrastive(feats, centers[:, :3], target, tau, valid, ctx, mask, index)
    with pytest.raises(ValueError, match="target must be"):
        fused_cluster_contrastive(feats, centers, target[:3], tau, valid, ctx, mask, index)
    with pytest.raises(ValueError, match="tau must be 0-d or"):
        fused_cluster_contrastive(feats, centers, target, tau[:3], valid, ctx, mask, index)
    with pytest.raises(ValueError, match="0-d tensor"):
        fused_cluster_contrastive(feats, centers, target, tau.clone().requires_grad_(), valid, ctx, mask, index)
    with pytest.raises(ValueError, match="pass index="):
        fused_cluster_contrastive(feats, centers, target, tau, valid, ctx, mask)
    with pytest.raises(TypeError, match="sample_mask"):
        fused_cluster_contrastive(feats, centers, target, tau, valid, ctx, mask.float(), index)
    with pytest.raises(TypeError, match="valid"):
        fused_cluster_contrastive(feats, centers, target, tau, valid.long(), ctx, mask, index)
    with pytest.raises(ValueError, match="chunk"):
        fused_cluster_contrastive(feats, centers, target, tau, valid, ctx, mask, index, chunk=0)


def test_con_sample_rate_config_and_train_override():
    from partial_fc import PartialFCConfig
    from train import config as C

    assert PartialFCConfig(num_classes=10).con_sample_rate is None  # default: the CE's sample
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="con_sample_rate must be in"):
            PartialFCConfig(num_classes=10, con_sample_rate=bad)
    cfg = C.load_config("cpu_demo", ["head.con_sample_rate=0.05"])
    head = cfg.head.resolve(100) if hasattr(cfg.head, "resolve") else cfg.head
    assert head.con_sample_rate == 0.05
    back = C.load_config("cpu_demo", ["head.con_sample_rate=0.05", "head.con_sample_rate=none"]).head
    assert (back.resolve(100) if hasattr(back, "resolve") else back).con_sample_rate is None
    with pytest.raises(C.ConfigError, match="con_sample_rate"):
        C.load_config("cpu_demo", ["head.con_sample_rat=0.1"])
    with pytest.raises(C.ConfigError, match=r"con_sample_rate must be in \(0, 1\]"):
        C.load_config("cpu_demo", ["head.con_sample_rate=2"])


def test_head_separate_con_sample_is_reproducible_and_keeps_positives():
    from partial_fc import PartialFCHead

    kw = dict(num_classes=200, embedding_size=8, sample_rate=0.3, method="s2", seed=4)
    centers = F.normalize(torch.randn(200, 8, generator=torch.Generator().manual_seed(1)), dim=1)

    def head(**extra):
        h = PartialFCHead(**kw, **extra)
        h.bank.centers.copy_(centers)
        h.bank.counts.fill_(1)
        return h

    heads = [head(con_sample_rate=r) for r in (0.1, 0.1, 0.3)]
    emb, labels = torch.randn(16, 8), torch.randint(0, 200, (16,))
    outs = [h(emb, labels) for h in heads]
    assert float(outs[0]["con"]) > 0
    torch.testing.assert_close(outs[0]["con"], outs[1]["con"], rtol=0, atol=0)  # same seed, same sample
    torch.testing.assert_close(outs[0]["ce"], outs[2]["ce"], rtol=0, atol=0)  # the CE sample is untouched
    assert heads[0].last_stats["con_sampled_local"] == max(20, len(set(labels.tolist())))
    assert heads[2].last_stats["con_sampled_local"] == heads[2].last_stats["num_sampled_local"] == 60
    # Same size as the CE's sample but another draw: a different Con value than the default.
    default = head()(emb, labels)
    assert not torch.equal(outs[2]["con"], default["con"])

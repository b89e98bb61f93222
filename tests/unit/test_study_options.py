"""The study's controls on the head: phi without the class-size term, phi shuffled across classes
(margin and Con temperature), and the offline phi refreshed by a full pass (single process; the
sharded versions are in tests/distributed/test_study_options_dist.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from partial_fc import PartialFCHead
from partial_fc.cluster import ClusterBank, class_permutation, offline_refresh
from partial_fc.distributed import ParallelContext

C, D = 13, 8


def bank_state(seed: int = 0, all_known: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 30, (C,), generator=g)
    state = {
        "centers": F.normalize(torch.randn(C, D, generator=g), dim=1),
        "counts": counts,
        "mean_dist": torch.rand(C, generator=g) * 0.8 + 0.2,
        "dist_obs": counts.clone(),
    }
    if not all_known:
        state["dist_obs"][[2, 5]] = 0
        state["mean_dist"][[2, 5]] = 0
    return state


def load(head: PartialFCHead, state: dict[str, torch.Tensor]) -> PartialFCHead:
    for k, v in state.items():
        getattr(head.bank, k).copy_(v)
    return head


def batch(seed: int = 1, n: int = 12):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g), torch.randint(0, C, (n,), generator=g)


def test_count_norm_none_is_the_mean_distance() -> None:
    st = bank_state()
    log = ClusterBank(C, D, alpha=10.0)
    none = ClusterBank(C, D, alpha=10.0, count_norm="none")
    for b in (log, none):
        for k, v in st.items():
            getattr(b, k).copy_(v)
    torch.testing.assert_close(none.phi(), st["mean_dist"])
    torch.testing.assert_close(log.phi(), st["mean_dist"] / torch.log(st["counts"].float() + 10.0))
    with pytest.raises(ValueError, match="count_norm"):
        ClusterBank(C, D, count_norm="sqrt")


@pytest.mark.parametrize("all_known", [True, False])
def test_count_norm_size_is_the_class_size_term_alone(all_known: bool) -> None:
    st = bank_state(all_known=all_known)
    size = ClusterBank(C, D, alpha=10.0, count_norm="size")
    for k, v in st.items():
        getattr(size, k).copy_(v)
    want = 1.0 / torch.log(st["counts"].float() + 10.0)
    want[st["dist_obs"] == 0] = float("nan")  # the same "no phi yet" as the PCL form
    torch.testing.assert_close(size.phi(), want, equal_nan=True)
    # Known dataset counts take the place of the observed ones, as in the PCL form.
    size.class_counts.copy_(torch.arange(C) + 2)
    phi = size.phi()
    ok = st["dist_obs"] > 0
    torch.testing.assert_close(phi[ok], 1.0 / torch.log(torch.arange(C)[ok].float() + 12.0))
    # The distance plays no part: a class of any looseness with the same Z has the same phi.
    size.mean_dist.mul_(3.0)
    torch.testing.assert_close(size.phi(), phi, equal_nan=True)


def test_new_options_are_validated() -> None:
    for key, bad in (("phi_count_norm", "sqrt"), ("phi_shuffle", "yes"), ("phi_refresh", "daily")):
        with pytest.raises(ValueError, match=key):
            PartialFCHead(num_classes=C, embedding_size=D, method="s6", **{key: bad})


def test_permutation_is_a_fixed_function_of_the_seed() -> None:
    p = class_permutation(1000, 3)
    assert torch.equal(torch.sort(p).values, torch.arange(1000))
    assert torch.equal(p, class_permutation(1000, 3)) and not torch.equal(p, class_permutation(1000, 4))


@pytest.mark.parametrize("all_known", [True, False])
def test_shuffled_margin_is_the_margin_of_the_source_class(all_known: bool) -> None:
    common = dict(num_classes=C, embedding_size=D, method="s1", seed=5, phi_percentiles=(0.0, 100.0))
    st = bank_state(all_known=all_known)
    plain = load(PartialFCHead(**common), st)
    shuf = load(PartialFCHead(**common, phi_shuffle="margin"), st)
    perm = class_permutation(C, 5)
    phi_a, lam_a, pa = plain.class_margins()
    phi_b, lam_b, pb = shuf.class_margins()
    torch.testing.assert_close(phi_b, phi_a, equal_nan=True)  # the bank itself is untouched
    torch.testing.assert_close(pb.m2, pa.m2[perm])
    # Same margin distribution, no information: equal as multisets, not per class.
    torch.testing.assert_close(torch.sort(pb.m2).values, torch.sort(pa.m2).values)
    assert not torch.equal(pb.m2, pa.m2)


@pytest.mark.parametrize("method,mode", [("s1", "margin"), ("s2", "temperature"), ("s4", "both")])
def test_shuffle_equals_the_method_on_a_permuted_bank(method: str, mode: str) -> None:
    """With every class known, shuffling phi is the method run on a bank whose per-class
    statistics (distance, counts) were permuted while its centers stayed: loss and gradient agree."""
    common = dict(num_classes=C, embedding_size=D, method=method, seed=5, s=16.0, phi_percentiles=(0.0, 100.0))
    st = bank_state()
    perm = class_permutation(C, 5)
    moved = dict(st, **{k: st[k][perm] for k in ("mean_dist", "counts", "dist_obs")})
    x, y = batch()
    out = []
    heads = (load(PartialFCHead(**common, phi_shuffle=mode), st), load(PartialFCHead(**common), moved),
             load(PartialFCHead(**common), st))
    for head in heads:
        e = x.clone().requires_grad_()
        loss = head(e, y)["loss"]
        loss.backward()
        out.append((loss.detach(), e.grad))
    torch.testing.assert_close(out[0][0], out[1][0])
    torch.testing.assert_close(out[0][1], out[1][1])
    assert not torch.allclose(out[0][1], out[2][1])  # and the shuffle does change the step


def test_temperature_shuffle_leaves_the_margin_alone() -> None:
    common = dict(num_classes=C, embedding_size=D, method="s4", seed=5, phi_percentiles=(0.0, 100.0))
    st = bank_state()
    _, _, pa = load(PartialFCHead(**common), st).class_margins()
    _, _, pb = load(PartialFCHead(**common, phi_shuffle="temperature"), st).class_margins()
    torch.testing.assert_close(pa.m2, pb.m2)


def test_offline_refresh_matches_a_direct_computation() -> None:
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(40, D, generator=g)
    labels = torch.randint(0, C - 1, (40,), generator=g)  # class C-1 is never seen
    bank = ClusterBank(C, D)
    bank.centers[C - 1] = F.normalize(torch.ones(D), dim=0)
    bank.counts[C - 1] = 7
    info = offline_refresh(bank, 0, C, [(feats[:25], labels[:25]), (feats[25:], labels[25:])],
                           ParallelContext.from_group(None))
    f = F.normalize(feats.double(), dim=1)
    for c in range(C - 1):
        sel = labels == c
        if not sel.any():
            assert bank.counts[c] == 0
            continue
        center = F.normalize(f[sel].mean(0), dim=0)
        torch.testing.assert_close(bank.centers[c], center.float())
        torch.testing.assert_close(bank.mean_dist[c], (f[sel] - center).norm(dim=1).mean().float())
        assert int(bank.counts[c]) == int(sel.sum()) == int(bank.dist_obs[c])
    assert int(bank.counts[C - 1]) == 7  # unseen: kept
    assert info == {"features": 40, "classes": int(torch.unique(labels).numel())}
    with pytest.raises(ValueError, match="labels outside"):
        offline_refresh(bank, 0, C, [(feats[:2], torch.tensor([0, C]))], ParallelContext.from_group(None))


def test_offline_head_needs_a_refresh_and_then_leaves_the_bank_alone() -> None:
    head = PartialFCHead(num_classes=C, embedding_size=D, method="s6", phi_refresh="offline")
    x, y = batch()
    with pytest.raises(RuntimeError, match="offline_refresh"):
        head(x, y)
    offline_refresh(head.bank, 0, C, [(x, y)], head.ctx)
    before = {k: v.clone() for k, v in head.bank.state_dict().items()}
    head(x * 2 + 1, y)["loss"].backward()
    for k, v in head.bank.state_dict().items():
        assert torch.equal(v, before[k]), k
    online = PartialFCHead(num_classes=C, embedding_size=D, method="s6")
    online(x, y)
    assert bool(online.bank.counts.any())

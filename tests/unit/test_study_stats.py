"""train.ablate.stats on inputs whose answer is known (and against scipy / the project's ROC code)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from train.ablate import stats as st


def _toy(seed: int = 0, ids: int = 30, per: int = 6, d: int = 16, noise: float = 0.6):
    r = np.random.default_rng(seed)
    centers = r.normal(size=(ids, d))
    labels = np.repeat(np.arange(ids), per)
    return centers[labels] + noise * r.normal(size=(labels.size, d)), labels


def test_all_pairs_counts_and_scores() -> None:
    emb, labels = _toy()
    p = st.all_pair_scores(emb, labels, block=7)
    m = labels.size
    assert p["gen"].size == 30 * 15 and p["imp"].size == m * (m - 1) // 2 - 30 * 15
    assert (p["gen_i"] < p["gen_j"]).all() and (p["imp_i"] < p["imp_j"]).all()
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    np.testing.assert_allclose(p["imp"][:50], (e[p["imp_i"][:50]] * e[p["imp_j"][:50]]).sum(1), atol=1e-6)
    assert (labels[p["gen_i"]] == labels[p["gen_j"]]).all() and (labels[p["imp_i"]] != labels[p["imp_j"]]).all()
    s = st.all_pair_scores(emb, labels, max_impostors=1000, seed=1)
    assert s["imp"].size == 1000 and s["gen"].size == p["gen"].size
    assert set(zip(s["imp_i"].tolist(), s["imp_j"].tolist())) <= set(zip(p["imp_i"].tolist(), p["imp_j"].tolist()))


def test_tar_matches_the_project_roc_code() -> None:
    from train.evaluate.verification import tar_at_far

    emb, labels = _toy(noise=1.2)
    p = st.all_pair_scores(emb, labels)
    scores = np.concatenate([p["gen"], p["imp"]])
    issame = np.concatenate([np.ones(p["gen"].size, bool), np.zeros(p["imp"].size, bool)])
    want = tar_at_far(scores, issame, [1e-2, 1e-3])
    for far in (1e-2, 1e-3):
        assert st.tar_at_threshold(p["gen"], st.threshold_at_far(p["imp"], far)) == pytest.approx(want[far])
    assert math.isnan(st.threshold_at_far(np.zeros(10), 1e-3))  # 10 impostors cannot measure 1e-3


def test_threshold_counts_exactly() -> None:
    imp = np.arange(10000, dtype=float)
    thr = st.threshold_at_far(imp, 1e-3)
    assert (imp > thr).sum() == 10
    assert st.tar_at_threshold(np.array([9990.5, 9989.0, 1e9]), thr) == pytest.approx(2 / 3)


def test_group_verification_splits() -> None:
    # 4 identities, 2 images each; identities 0 and 1 form a family and their impostor pairs score high.
    emb = np.array([[1, 0, 0], [1, 0.05, 0], [1, 0.1, 0.02], [1, 0.12, 0], [0, 1, 0], [0, 1, 0.3],
                    [0, 0, 1], [0.3, 0, 1]], dtype=float)
    identity = np.repeat(np.arange(4), 2)
    p = st.all_pair_scores(emb, identity)
    fam = np.array([0, 0, -1, -1])
    out = st.group_verification(p, identity, {"fam": fam >= 0, "rest": fam < 0}, family=fam, fars=(0.1,))
    thr = st.threshold_at_far(p["imp"], 0.1)
    assert out["n_lookalike_impostors"] == 4
    look = (identity[p["imp_i"]] < 2) & (identity[p["imp_j"]] < 2)  # impostor pairs of identities 0 and 1
    assert look.sum() == 4
    assert out["fa_lookalike_1e-1"] == pytest.approx((p["imp"][look] > thr).mean())
    # 24 impostors at FAR 0.1: the 2 accepted are both look-alike pairs (of 4).
    assert out["fa_lookalike_1e-1"] == 0.5 and (p["imp"][~look] > thr).sum() == 0
    unmeasurable = st.group_verification(p, identity, {}, family=fam, fars=(1e-3,))  # 24 impostors
    assert math.isnan(unmeasurable["tar_1e-3"]) and math.isnan(unmeasurable["fa_lookalike_1e-3"])
    g = identity[p["gen_i"]]
    assert out["tar_1e-1_fam"] == pytest.approx((p["gen"][g < 2] > thr).mean())


def test_spearman_and_pearson_against_scipy() -> None:
    from scipy import stats

    r = np.random.default_rng(3)
    x = r.normal(size=200)
    y = np.exp(x) + 0.3 * r.normal(size=200)
    y[::7] = np.round(y[::7])  # some ties
    assert st.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
    assert st.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
    assert st.spearman(x, np.exp(3 * x)) == pytest.approx(1.0)  # monotone: rank correlation 1
    assert st.spearman(x, -x) == pytest.approx(-1.0)
    assert abs(st.spearman(x, r.normal(size=200))) < 0.2
    x2 = x.copy()
    x2[:5] = np.nan
    assert st.spearman(x2, y) == pytest.approx(stats.spearmanr(x[5:], y[5:])[0], abs=1e-12)
    assert st.stability([x, x, -x]) == pytest.approx([1.0, -1.0])


def test_bootstrap_ci_covers_a_known_difference() -> None:
    """Coverage of the 95% interval over many synthetic studies with a true difference of 0.02."""
    r = np.random.default_rng(0)
    hits_boot = hits_t = 0
    trials = 300
    for k in range(trials):
        d = 0.02 + 0.01 * r.standard_normal(20)
        lo, hi = st.bootstrap_ci(d, n_boot=2000, seed=k)
        hits_boot += lo <= 0.02 <= hi
        tlo, thi = st.t_interval(d)
        hits_t += tlo <= 0.02 <= thi
    assert 0.89 <= hits_boot / trials <= 0.98
    assert 0.91 <= hits_t / trials <= 0.99


def test_paired_difference_and_sign_test() -> None:
    base = np.array([0.50, 0.60, 0.55, 0.52, 0.58])
    out = st.paired_difference(base + np.array([0.01, 0.02, 0.015, 0.012, 0.018]), base)
    assert out["mean"] == pytest.approx(0.015) and out["wins"] == 5 and out["losses"] == 0
    assert out["sign_p"] == pytest.approx(2 / 32)
    assert 0.01 <= out["boot_lo"] < out["mean"] < out["boot_hi"] <= 0.02
    assert out["t_lo"] < out["boot_lo"] and out["t_hi"] > out["boot_hi"]  # t is wider at n = 5
    assert st.sign_test_p(3, 2) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        st.paired_difference([1, 2], [1, 2, 3])


def test_terciles() -> None:
    t = st.terciles([5, 1, 9, 3, 7, 2])
    assert t.tolist() == [1, 0, 2, 1, 2, 0]

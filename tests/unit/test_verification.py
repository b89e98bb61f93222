import math

import numpy as np
import pytest

from train.evaluate import best_threshold, roc_curve, tar_at_far, ten_fold_accuracy


def test_best_threshold_hand_case():
    scores = np.array([0.9, 0.8, 0.7, 0.4, 0.3, 0.1])
    same = np.array([True, True, False, True, False, False])
    t, acc = best_threshold(scores, same)
    # Cutting after 0.8 (2 TP, 3 TN) or after 0.4 (3 TP, 2 TN) both give 5/6; the first is kept.
    assert acc == pytest.approx(5 / 6)
    assert 0.7 < t < 0.8


def test_ties_stay_on_one_side():
    t, acc = best_threshold(np.array([0.5, 0.5, 0.5, 0.5]), np.array([True, False, True, False]))
    assert acc == pytest.approx(0.5)


def test_ten_fold_separable_toy_set():
    rng = np.random.default_rng(0)
    same = rng.random(600) < 0.5
    scores = np.where(same, rng.uniform(0.6, 1.0, 600), rng.uniform(-1.0, 0.4, 600))
    acc, std, thr = ten_fold_accuracy(scores, same)
    assert acc == 1.0 and std == 0.0 and 0.4 < thr < 0.6


def test_ten_fold_chance_level():
    rng = np.random.default_rng(1)
    acc, _, _ = ten_fold_accuracy(rng.random(4000), rng.random(4000) < 0.5)
    assert 0.45 < acc < 0.56


def test_tar_at_far_constructed():
    # 1000 negatives with scores 0.000..0.999 and 10 positives at known scores.
    neg = np.arange(1000) / 1000.0
    pos = np.array([0.9995, 0.9985, 0.995, 0.99, 0.95, 0.9, 0.5, 0.2, 0.1, 0.05])
    scores = np.concatenate([neg, pos])
    same = np.concatenate([np.zeros(1000, bool), np.ones(10, bool)])
    res = tar_at_far(scores, same, [1e-3, 1e-2, 1e-1, 1e-4])
    # FAR <= 1e-3 allows 1 negative (0.999); the threshold can go down to just above the next
    # negative (0.998), accepting positives 0.9995 and 0.9985 -> 2 of 10.
    assert res[1e-3] == pytest.approx(0.2)
    # FAR <= 1e-2 allows 10 negatives (0.990..0.999), threshold just above 0.989: 4 positives.
    assert res[1e-2] == pytest.approx(0.4)
    # FAR <= 1e-1 allows 100 negatives, threshold just above 0.899: 6 positives.
    assert res[1e-1] == pytest.approx(0.6)
    assert math.isnan(res[1e-4])  # 1000 negatives cannot measure 1e-4


def test_roc_monotone_and_errors():
    far, tar, thr = roc_curve(np.array([0.1, 0.4, 0.35, 0.8]), np.array([False, False, True, True]))
    assert (np.diff(far) >= 0).all() and (np.diff(tar) >= 0).all() and (np.diff(thr) < 0).all()
    assert far[-1] == 1.0 and tar[-1] == 1.0
    with pytest.raises(ValueError, match="both"):
        roc_curve(np.array([0.1]), np.array([True]))
    with pytest.raises(ValueError, match="non-finite"):
        best_threshold(np.array([np.nan]), np.array([True]))


# ------------------------------------------------------------------ pfc eval additions
from train.evaluate.verification import FAR_GRID, measurable_fars, score_summary, verify_scores  # noqa: E402


def test_measurable_fars_follow_the_negative_count():
    kept, omitted = measurable_fars(1000, FAR_GRID)
    assert kept == [1e-3, 1e-2, 1e-1] and omitted == [1e-6, 1e-5, 1e-4]
    kept, omitted = measurable_fars(999, FAR_GRID)  # one short of 1/1e-3
    assert kept == [1e-2, 1e-1] and 1e-3 in omitted
    assert measurable_fars(0, (1e-1,)) == ([], [1e-1])


def test_verify_scores_constructed_set():
    # 1000 negatives at 0.000..0.999, 10 positives at known scores (same set as above).
    neg = np.arange(1000) / 1000.0
    pos = np.array([0.9995, 0.9985, 0.995, 0.99, 0.95, 0.9, 0.5, 0.2, 0.1, 0.05])
    scores = np.concatenate([neg, pos])
    same = np.concatenate([np.zeros(1000, bool), np.ones(10, bool)])
    r = verify_scores(scores, same, name="toy", folds=10)
    assert r.omitted_fars == [1e-6, 1e-5, 1e-4]
    assert r.tar == pytest.approx({1e-3: 0.2, 1e-2: 0.4, 1e-1: 0.6})
    assert r.scores.num_pos == 10 and r.scores.num_neg == 1000
    assert r.scores.pos_mean == pytest.approx(pos.mean()) and r.scores.neg_mean == pytest.approx(0.4995)
    assert r.scores.gap == pytest.approx(pos.mean() - 0.4995)
    d = r.to_dict()
    assert d["tar_at_far"] == pytest.approx({"1e-03": 0.2, "1e-02": 0.4, "1e-01": 0.6})
    assert d["omitted_fars"] == ["1e-06", "1e-05", "1e-04"] and d["name"] == "toy"


def test_score_summary_hand_case():
    s = score_summary(np.array([0.9, 0.7, 0.1, -0.1]), np.array([True, True, False, False]))
    assert (s.pos_mean, s.neg_mean, s.gap) == pytest.approx((0.8, 0.0, 0.8))
    assert (s.pos_std, s.neg_std) == pytest.approx((0.1, 0.1))

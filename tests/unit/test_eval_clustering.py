"""Clustering metrics against hand-computed cases."""

import numpy as np
import pytest

from train.evaluate.clustering import bcubed, clustering_scores, nmi, pairwise_f


def test_perfect_clustering_any_ids():
    t = [0, 0, 1, 1, 2]
    p = [7, 7, 3, 3, 9]
    assert pairwise_f(t, p) == (1.0, 1.0, 1.0)
    assert bcubed(t, p) == (1.0, 1.0, 1.0)
    assert nmi(t, p) == pytest.approx(1.0)


def test_hand_case():
    # truth: A A A B B ; prediction: {0,1} {2,3,4}
    t = [0, 0, 0, 1, 1]
    p = [0, 0, 1, 1, 1]
    # Pairs together: {01} + {23,24,34} = 4; true among them: 01, 34 = 2; true pairs: 3 + 1 = 4.
    assert pairwise_f(t, p) == pytest.approx((0.5, 0.5, 0.5))
    # BCubed precision per sample: 1, 1, 1/3, 2/3, 2/3 -> 11/15; recall: 2/3, 2/3, 1/3, 1, 1 -> 11/15.
    bp, br, bf = bcubed(t, p)
    assert bp == pytest.approx(11 / 15) and br == pytest.approx(11 / 15) and bf == pytest.approx(11 / 15)


def test_all_in_one_cluster_and_all_singletons():
    t = [0, 0, 1, 1]
    # One cluster: BCubed precision 1/2 for everyone, recall 1.
    assert bcubed(t, [5, 5, 5, 5]) == pytest.approx((0.5, 1.0, 2 / 3))
    # Singletons: precision 1, recall 1/2; pairwise precision 1 by convention, recall 0.
    assert bcubed(t, [0, 1, 2, 3]) == pytest.approx((1.0, 0.5, 2 / 3))
    assert pairwise_f(t, [0, 1, 2, 3]) == (1.0, 0.0, 0.0)


def test_noise_labels_are_singletons():
    t = [0, 0, 1, 1]
    # Two noise points must not be merged into one "-1" cluster.
    assert bcubed(t, [-1, -1, 3, 3]) == pytest.approx(bcubed(t, [8, 9, 3, 3]))
    assert pairwise_f(t, [-1, -1, 3, 3]) == pytest.approx((1.0, 0.5, 2 / 3))


def test_nmi_independent_partition_is_low_and_scores_bundle():
    rng = np.random.default_rng(0)
    t = np.repeat(np.arange(20), 50)
    p = rng.integers(0, 20, t.size)
    assert nmi(t, p) < 0.1
    s = clustering_scores(t, t)
    assert s.nmi == pytest.approx(1.0) and s.bcubed_f == 1.0 and s.num_clusters == 20


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ in length"):
        bcubed([0, 1], [0])

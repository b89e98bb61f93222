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


# ------------------------------------------------------------------ the protocol runner
from train.evaluate.clustering import (  # noqa: E402
    ClusteringProtocolConfig,
    bcubed_per_sample,
    dbscan_eps,
    default_subset_sizes,
    identity_subsets,
    run_clustering_protocol,
)


def _blobs(k=12, n=10, d=32, spread=0.2, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((k, d))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    x = np.repeat(centers, n, 0) + spread * rng.standard_normal((k * n, d)) / np.sqrt(d)
    return x, np.repeat(np.arange(k) * 10 + 3, n)  # identity ids need not be 0..k-1


def test_protocol_on_separable_blobs_recovers_identities():
    x, y = _blobs()
    runs = run_clustering_protocol(x, y, ClusteringProtocolConfig(sizes=(4, 12)))
    assert [(r.num_identities, r.algorithm) for r in runs] == [
        (4, "kmeans"), (4, "dbscan"), (4, "agglomerative"), (12, "kmeans"), (12, "dbscan"), (12, "agglomerative")]
    for r in runs:
        assert r.num_samples == r.num_identities * 10 and len(r.predictions) == r.num_samples
        if r.algorithm == "dbscan":
            # The eps rule leaves about 1 - quantile (30%) of the points non-core; most of them are
            # border points that join their identity, the rest become noise (singletons). Nothing
            # is merged into a wrong identity. (With a fixed, adequate eps it is exact: see below.)
            assert r.scores.pairwise_precision == 1.0 and r.noise_fraction <= 0.2 and r.scores.nmi > 0.8, r
        else:
            assert r.scores.nmi > 0.999 and r.scores.bcubed_f > 0.999 and r.scores.pairwise_f > 0.999, r
            assert r.scores.num_clusters == r.num_identities
    assert runs[1].params["eps_rule"].startswith("k-distance")


def test_protocol_on_random_features_scores_low():
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((200, 32)), np.repeat(np.arange(20), 10)
    for r in run_clustering_protocol(x, y, ClusteringProtocolConfig(sizes=(20,))):
        assert r.scores.bcubed_f < 0.5 and r.scores.pairwise_f < 0.5, r
        if r.algorithm != "dbscan":  # a handful of noise singletons inflates NMI a little
            assert r.scores.nmi < 0.4, r


def test_subsets_are_nested_and_complete():
    y = np.repeat(np.arange(10), 3)
    small, big = identity_subsets(y, [3, 7], seed=5)
    assert set(small) <= set(big)
    assert len(np.unique(y[small])) == 3 and len(np.unique(y[big])) == 7
    assert all((y == i).sum() == 3 for i in np.unique(y[big]))  # every image of a chosen identity
    assert default_subset_sizes(10) == (3, 5, 10) and default_subset_sizes(2) == (2,)
    with pytest.raises(ValueError, match="exceed the 10 identities"):
        identity_subsets(y, [11])


def test_dbscan_eps_rule_by_hand():
    # Unit vectors at angles 0, 0.1, 0.2 and 1.5 rad: with min_samples=2 each point's k-distance is
    # the cosine distance to its nearest neighbour.
    ang = np.array([0.0, 0.1, 0.2, 1.5])
    x = np.stack([np.cos(ang), np.sin(ang)], 1)
    kth = np.array([1 - np.cos(0.1), 1 - np.cos(0.1), 1 - np.cos(0.1), 1 - np.cos(1.3)])
    assert dbscan_eps(x, min_samples=2, quantile=0.5) == pytest.approx(np.quantile(kth, 0.5))
    assert dbscan_eps(x, min_samples=2, quantile=1.0) == pytest.approx(1 - np.cos(1.3))
    assert dbscan_eps(x, min_samples=1, quantile=1.0) == pytest.approx(1e-6)  # itself: distance 0


def test_fixed_eps_and_ward():
    x, y = _blobs(k=5)
    cfg = ClusteringProtocolConfig(sizes=(5,), algorithms=("dbscan", "agglomerative"), dbscan_eps=0.3, linkage="ward")
    dbs, agg = run_clustering_protocol(x, y, cfg)
    assert dbs.params == {"eps": 0.3, "min_samples": 3, "eps_rule": "fixed"} and dbs.scores.nmi > 0.999
    assert agg.params["linkage"] == "ward" and agg.scores.nmi > 0.999


def test_bcubed_per_sample_matches_bcubed():
    t = [0, 0, 0, 1, 1, 2]
    p = [0, 0, 1, 1, 1, -1]
    prec, rec = bcubed_per_sample(t, p)
    bp, br, _ = bcubed(t, p)
    assert prec.mean() == pytest.approx(bp) and rec.mean() == pytest.approx(br)
    assert prec == pytest.approx([1, 1, 1 / 3, 2 / 3, 2 / 3, 1])


@pytest.mark.parametrize("kwargs, match", [
    ({"algorithms": ("spectral",)}, "unknown clustering algorithm"),
    ({"sizes": (1,)}, ">= 2"),
    ({"dbscan_eps": 3.0}, "cosine distance"),
    ({"linkage": "single"}, "linkage"),
    ({"dbscan_quantile": 0.0}, "quantile"),
])
def test_protocol_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ClusteringProtocolConfig(**kwargs)


def test_protocol_input_errors():
    with pytest.raises(ValueError, match="non-finite"):
        run_clustering_protocol(np.full((4, 2), np.nan), [0, 0, 1, 1])
    with pytest.raises(ValueError, match="labels"):
        run_clustering_protocol(np.eye(4), [0, 0, 1])

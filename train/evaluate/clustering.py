"""Clustering quality metrics: NMI, pairwise F-measure and BCubed F-measure.

Every metric compares a predicted partition with the true identities of the same N samples.
NMI comes from scikit-learn (arithmetic-mean normalisation, the convention of the IJB-B
clustering protocol papers). The two F-measures are computed here from the contingency table,
in O(N + nnz) memory, because no well-kept library ships them:

- **Pairwise**: over all unordered pairs of samples, precision = pairs put together that share an
  identity / pairs put together; recall = the same / pairs that share an identity.
- **BCubed** (Bagga & Baldwin, 1998; Amigo et al., 2009): per sample, precision = fraction of its
  predicted cluster (itself included) with its identity, recall = fraction of its identity that is
  in its predicted cluster; both are averaged over samples.

Noise labels (e.g. DBSCAN's -1) are each treated as a singleton cluster, so an algorithm cannot
raise precision by declaring points noise for free.

:func:`run_clustering_protocol` is the IJB-B-clustering-style runner: nested subsets of increasing
identity count, each clustered by K-means, DBSCAN and agglomerative clustering (scikit-learn) on
L2-normalised embeddings, each scored with the metrics above. See docs/evaluation.md.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import numpy as np

__all__ = [
    "ALGORITHMS",
    "ClusteringProtocolConfig",
    "ClusteringRun",
    "ClusteringScores",
    "bcubed",
    "bcubed_per_sample",
    "clustering_scores",
    "dbscan_eps",
    "default_subset_sizes",
    "identity_subsets",
    "nmi",
    "pairwise_f",
    "run_clustering_protocol",
]

ALGORITHMS = ("kmeans", "dbscan", "agglomerative")


@dataclass(frozen=True)
class ClusteringScores:
    """Scores of one clustering against the truth (all in [0, 1])."""

    nmi: float
    pairwise_precision: float
    pairwise_recall: float
    pairwise_f: float
    bcubed_precision: float
    bcubed_recall: float
    bcubed_f: float
    num_clusters: int


def _labels(labels_true, labels_pred) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(labels_true).ravel()
    p = np.asarray(labels_pred).ravel().astype(np.int64)
    if t.shape != p.shape:
        raise ValueError(f"labels_true ({t.shape[0]}) and labels_pred ({p.shape[0]}) differ in length")
    if t.size == 0:
        raise ValueError("no samples to score")
    # Noise points (negative labels) become singletons with fresh ids.
    noise = p < 0
    if noise.any():
        p = p.copy()
        p[noise] = p.max(initial=-1) + 1 + np.arange(int(noise.sum()))
    _, t = np.unique(t, return_inverse=True)
    _, p = np.unique(p, return_inverse=True)
    return t.astype(np.int64), p.astype(np.int64)


def _contingency(t: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sparse contingency: per non-empty (true, pred) cell its index arrays and count."""
    cells = t * (int(p.max()) + 1) + p
    uniq, inverse, counts = np.unique(cells, return_inverse=True, return_counts=True)
    return uniq // (int(p.max()) + 1), uniq % (int(p.max()) + 1), counts, inverse


def _f(p: float, r: float) -> float:
    return 0.0 if p + r == 0 else 2.0 * p * r / (p + r)


def pairwise_f(labels_true, labels_pred) -> tuple[float, float, float]:
    """Pairwise precision, recall and F-measure.

    Args:
        labels_true: [N] identity of each sample (any hashable numbers).
        labels_pred: [N] predicted cluster id; negative ids are noise (singletons).

    Returns:
        (precision, recall, f). A partition with no pair put together has precision 1 by
        convention (it makes no false merge); with no true pair, recall is 1.
    """
    t, p = _labels(labels_true, labels_pred)
    _, _, n_ij, _ = _contingency(t, p)
    pairs = lambda c: (c.astype(np.float64) * (c - 1) / 2.0).sum()  # noqa: E731
    tp = pairs(n_ij)
    pred_pairs = pairs(np.bincount(p))
    true_pairs = pairs(np.bincount(t))
    precision = 1.0 if pred_pairs == 0 else tp / pred_pairs
    recall = 1.0 if true_pairs == 0 else tp / true_pairs
    return float(precision), float(recall), _f(float(precision), float(recall))


def bcubed(labels_true, labels_pred) -> tuple[float, float, float]:
    """BCubed precision, recall and F-measure (averaged over samples).

    Args:
        labels_true: [N] identity of each sample.
        labels_pred: [N] predicted cluster id; negative ids are noise (singletons).

    Returns:
        (precision, recall, f).
    """
    t, p = _labels(labels_true, labels_pred)
    ti, pj, n_ij, _ = _contingency(t, p)
    size_t = np.bincount(t).astype(np.float64)
    size_p = np.bincount(p).astype(np.float64)
    # Each of the n_ij samples in cell (i, j) has precision n_ij/|p_j| and recall n_ij/|t_i|.
    n = float(t.size)
    precision = float((n_ij * (n_ij / size_p[pj])).sum() / n)
    recall = float((n_ij * (n_ij / size_t[ti])).sum() / n)
    return precision, recall, _f(precision, recall)


def bcubed_per_sample(labels_true, labels_pred) -> tuple[np.ndarray, np.ndarray]:
    """Each sample's BCubed precision and recall (their means are :func:`bcubed`'s figures).

    Useful to score a part of the samples, e.g. the images of the hardest identities.

    Returns:
        ``(precision [N], recall [N])`` float64.
    """
    t, p = _labels(labels_true, labels_pred)
    ti, pj, n_ij, inverse = _contingency(t, p)
    size_t = np.bincount(t).astype(np.float64)
    size_p = np.bincount(p).astype(np.float64)
    return (n_ij / size_p[pj])[inverse], (n_ij / size_t[ti])[inverse]


def nmi(labels_true, labels_pred) -> float:
    """Normalized mutual information (arithmetic normalisation; scikit-learn)."""
    try:
        from sklearn.metrics import normalized_mutual_info_score
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("clustering NMI needs scikit-learn: pip install 'partial-fc[eval]'") from e
    t, p = _labels(labels_true, labels_pred)
    return float(normalized_mutual_info_score(t, p, average_method="arithmetic"))


def clustering_scores(labels_true, labels_pred) -> ClusteringScores:
    """All metrics of one clustering at once."""
    pp, pr, pf = pairwise_f(labels_true, labels_pred)
    bp, br, bf = bcubed(labels_true, labels_pred)
    _, p = _labels(labels_true, labels_pred)
    return ClusteringScores(nmi=nmi(labels_true, labels_pred), pairwise_precision=pp, pairwise_recall=pr,
                            pairwise_f=pf, bcubed_precision=bp, bcubed_recall=br, bcubed_f=bf,
                            num_clusters=int(p.max()) + 1)


# ------------------------------------------------------------------------------------- protocol
@dataclass(frozen=True)
class ClusteringProtocolConfig:
    """Settings of :func:`run_clustering_protocol`.

    Attributes:
        sizes: Identity counts of the nested subsets (``None``: :func:`default_subset_sizes`).
        algorithms: Any of ``"kmeans"``, ``"dbscan"``, ``"agglomerative"``.
        seed: Seed of the subset draw and of K-means.
        kmeans_n_init: K-means restarts (fixed, so results do not depend on a library default).
        dbscan_eps: Cosine-distance radius; ``None`` applies the k-distance rule of
            :func:`dbscan_eps` on each subset.
        dbscan_min_samples: DBSCAN's ``min_samples`` (the point itself included).
        dbscan_quantile: Quantile of the k-distances that the rule takes as ``eps``.
        linkage: ``"average"`` (cosine distance) or ``"ward"`` (Euclidean on normalised
            features, which is monotone in cosine distance).
    """

    sizes: Optional[tuple[int, ...]] = None
    algorithms: tuple[str, ...] = ALGORITHMS
    seed: int = 0
    kmeans_n_init: int = 10
    dbscan_eps: Optional[float] = None
    dbscan_min_samples: int = 3
    dbscan_quantile: float = 0.7
    linkage: str = "average"

    def __post_init__(self) -> None:
        bad = [a for a in self.algorithms if a not in ALGORITHMS]
        if bad or not self.algorithms:
            raise ValueError(f"unknown clustering algorithm(s) {bad}; choose from {list(ALGORITHMS)}")
        if self.sizes is not None and (not self.sizes or any(int(k) < 2 for k in self.sizes)):
            raise ValueError(f"subset sizes must be identity counts >= 2, got {self.sizes}")
        if self.kmeans_n_init < 1:
            raise ValueError("kmeans_n_init must be >= 1")
        if self.dbscan_eps is not None and not 0.0 < self.dbscan_eps <= 2.0:
            raise ValueError(f"dbscan_eps is a cosine distance in (0, 2], got {self.dbscan_eps}")
        if self.dbscan_min_samples < 1:
            raise ValueError("dbscan_min_samples must be >= 1")
        if not 0.0 < self.dbscan_quantile <= 1.0:
            raise ValueError(f"dbscan_quantile must be in (0, 1], got {self.dbscan_quantile}")
        if self.linkage not in ("average", "ward"):
            raise ValueError(f"linkage must be 'average' or 'ward', got {self.linkage!r}")


@dataclass(frozen=True)
class ClusteringRun:
    """One (subset, algorithm) cell of the protocol.

    Attributes:
        num_identities: Identities in the subset (the true cluster count).
        num_samples: Images in the subset.
        algorithm: ``kmeans``, ``dbscan`` or ``agglomerative``.
        scores: The metrics.
        params: The parameters used (e.g. the DBSCAN eps the rule chose).
        seconds: Wall time of the clustering itself.
        noise_fraction: Fraction of samples labelled noise (DBSCAN; 0 otherwise).
        indices: ``[n]`` positions of the subset's samples in the input (not serialised).
        predictions: ``[n]`` predicted cluster of each (not serialised).
    """

    num_identities: int
    num_samples: int
    algorithm: str
    scores: ClusteringScores
    params: dict = field(default_factory=dict)
    seconds: float = 0.0
    noise_fraction: float = 0.0
    indices: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), repr=False)
    predictions: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), repr=False)

    def to_dict(self) -> dict:
        out = {"num_identities": self.num_identities, "num_samples": self.num_samples,
               "algorithm": self.algorithm, **asdict(self.scores), "params": dict(self.params),
               "seconds": round(self.seconds, 4), "noise_fraction": self.noise_fraction}
        return out


def default_subset_sizes(num_identities: int) -> tuple[int, ...]:
    """A quarter, half and all of the identities (at least 2 each, duplicates dropped)."""
    if num_identities < 2:
        raise ValueError(f"clustering needs at least 2 identities, got {num_identities}")
    sizes = {max(2, math.ceil(num_identities * f)) for f in (0.25, 0.5, 1.0)}
    return tuple(sorted(sizes))


def identity_subsets(labels: np.ndarray, sizes: Sequence[int], seed: int = 0) -> list[np.ndarray]:
    """Sample indices of nested identity subsets.

    One seeded permutation of the identities is drawn; the subset of size ``k`` holds every image
    of its first ``k`` identities, so each subset contains the smaller ones and difficulty grows
    only through the added identities.

    Args:
        labels: ``[N]`` identity of each sample.
        sizes: Identity counts, each at most the number of identities.
        seed: Seed of the permutation.

    Returns:
        One sorted ``[n_k]`` int64 index array per size, in the order of ``sizes``.
    """
    labels = np.asarray(labels).ravel()
    ids = np.unique(labels)
    too_big = [int(k) for k in sizes if int(k) > len(ids)]
    if too_big:
        raise ValueError(f"subset sizes {too_big} exceed the {len(ids)} identities of the clustering set")
    order = np.random.default_rng(seed).permutation(ids)
    return [np.nonzero(np.isin(labels, order[: int(k)]))[0] for k in sizes]


def _normalized(features: np.ndarray) -> np.ndarray:
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"features must be [N, D], got shape {f.shape}")
    norm = np.linalg.norm(f, axis=1, keepdims=True)
    if not np.isfinite(f).all() or (norm == 0).any():
        raise ValueError("non-finite or zero features: the model produced degenerate embeddings")
    return f / norm


def dbscan_eps(features: np.ndarray, min_samples: int = 3, quantile: float = 0.7) -> float:
    """The k-distance rule for DBSCAN's radius on cosine distance.

    For every sample, take the cosine distance to its ``min_samples``-th nearest sample (itself
    counted first, as DBSCAN counts it); ``eps`` is the ``quantile`` of these k-distances. With
    ``quantile = q`` about a fraction ``q`` of the samples are core points, so the rule adapts to
    how tightly the model packs identities without looking at labels.

    Args:
        features: ``[N, D]`` features (normalised here).
        min_samples: DBSCAN's ``min_samples``.
        quantile: In ``(0, 1]``.

    Returns:
        ``eps`` (a cosine distance, at least 1e-6).
    """
    f = _normalized(features)
    k = min(max(int(min_samples), 1), f.shape[0])
    dist = 1.0 - f @ f.T  # N is a clustering subset: the N x N matrix is what DBSCAN builds anyway
    np.fill_diagonal(dist, 0.0)
    kth = np.partition(dist, k - 1, axis=1)[:, k - 1]
    return float(max(np.quantile(np.clip(kth, 0.0, 2.0), quantile), 1e-6))


def _cluster(features: np.ndarray, algorithm: str, k: int, cfg: ClusteringProtocolConfig) -> tuple[np.ndarray, dict]:
    from sklearn.cluster import DBSCAN, AgglomerativeClustering, KMeans

    if algorithm == "kmeans":
        model = KMeans(n_clusters=k, n_init=cfg.kmeans_n_init, random_state=cfg.seed)
        return model.fit_predict(features), {"k": k, "n_init": cfg.kmeans_n_init}
    if algorithm == "dbscan":
        rule = cfg.dbscan_eps is None
        eps = dbscan_eps(features, cfg.dbscan_min_samples, cfg.dbscan_quantile) if rule else cfg.dbscan_eps
        model = DBSCAN(eps=eps, min_samples=cfg.dbscan_min_samples, metric="cosine")
        params = {"eps": eps, "min_samples": cfg.dbscan_min_samples,
                  "eps_rule": f"k-distance quantile {cfg.dbscan_quantile}" if rule else "fixed"}
        return model.fit_predict(features), params
    if cfg.linkage == "ward":
        model = AgglomerativeClustering(n_clusters=k, linkage="ward")
    else:
        model = AgglomerativeClustering(n_clusters=k, linkage="average", metric="cosine")
    return model.fit_predict(features), {"n_clusters": k, "linkage": cfg.linkage}


def run_clustering_protocol(
    features: np.ndarray, labels: np.ndarray, config: ClusteringProtocolConfig = ClusteringProtocolConfig(),
) -> list[ClusteringRun]:
    """Clusters nested identity subsets with each algorithm and scores the result.

    Args:
        features: ``[N, D]`` embeddings (L2-normalised here).
        labels: ``[N]`` true identity of each sample.
        config: Sizes, algorithms and their parameters.

    Returns:
        One :class:`ClusteringRun` per (subset, algorithm), subsets in increasing size.
    """
    try:
        import sklearn  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("the clustering protocol needs scikit-learn: pip install 'partial-fc[eval]'") from e
    f = _normalized(features)
    labels = np.asarray(labels).ravel()
    if labels.shape[0] != f.shape[0]:
        raise ValueError(f"{f.shape[0]} features for {labels.shape[0]} labels")
    n_ids = len(np.unique(labels))
    sizes = tuple(sorted(int(k) for k in config.sizes)) if config.sizes else default_subset_sizes(n_ids)
    runs = []
    for k, idx in zip(sizes, identity_subsets(labels, sizes, config.seed)):
        for algo in config.algorithms:
            t0 = time.perf_counter()
            pred, params = _cluster(f[idx], algo, k, config)
            seconds = time.perf_counter() - t0
            runs.append(ClusteringRun(num_identities=k, num_samples=len(idx), algorithm=algo,
                                      scores=clustering_scores(labels[idx], pred), params=params,
                                      seconds=seconds, noise_fraction=float((pred < 0).mean()),
                                      indices=idx, predictions=np.asarray(pred)))
    return runs

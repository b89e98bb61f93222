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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ClusteringScores", "bcubed", "clustering_scores", "nmi", "pairwise_f"]


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

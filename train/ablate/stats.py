"""Statistics of the cluster-guidance study (protocol study-v2): pair scores at scale, splits, paired intervals.

Everything here is plain numpy on arrays a run already has (embeddings, labels, per-identity
ground truth, per-seed metrics), so it is cheap next to training and testable on known inputs.

* :func:`all_pair_scores` / :func:`threshold_at_far` / :func:`tar_at_threshold`: verification
  over *every* pair of a held-out set (or a seeded sample of at most ``max_impostors`` impostor
  pairs): 3,200 images give 5.1M pairs, so TAR@1e-4 rests on ~500 impostors above the threshold
  instead of 2.
* :func:`group_verification`: TAR at the global threshold for the genuine pairs of a group of
  identities (look-alike, tail, high-nuisance...) and the false-accept rate of look-alike
  impostor pairs (two identities of the same family).
* :func:`spearman`, :func:`pearson`, :func:`stability`: per-run correlations of phi.
* :func:`paired_difference`: the per-seed differences of a variant to the baseline, their mean,
  a 95% percentile-bootstrap interval, a t interval, wins and the exact two-sided sign-test p.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import numpy as np

__all__ = [
    "all_pair_scores", "threshold_at_far", "tar_at_threshold", "group_verification", "rankdata", "spearman",
    "pearson", "stability", "bootstrap_ci", "t_interval", "sign_test_p", "paired_difference", "terciles",
]


# ------------------------------------------------------------------------------------- pairs
def all_pair_scores(emb: np.ndarray, labels: np.ndarray, *, max_impostors: Optional[int] = None,
                    seed: int = 0, block: int = 1024) -> dict[str, np.ndarray]:
    """Cosine scores of every genuine pair and of every (or a sample of) impostor pair.

    Args:
        emb: ``[M, D]`` embeddings (L2-normalised here).
        labels: ``[M]`` identity of each embedding.
        max_impostors: Keep at most this many impostor pairs, a uniform sample without
            replacement drawn from ``seed`` (``None``: all of them).
        block: Rows per similarity block (bounds the ``[block, M]`` temporary).

    Returns:
        ``{"gen": [G] scores, "gen_i": [G], "gen_j": [G], "imp": [I], "imp_i": [I], "imp_j": [I]}``
        with ``i < j`` row indices of each pair.
    """
    emb = np.asarray(emb, dtype=np.float64)
    labels = np.asarray(labels)
    if emb.ndim != 2 or labels.shape != (emb.shape[0],):
        raise ValueError(f"emb must be [M, D] and labels [M], got {emb.shape} and {labels.shape}")
    e = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    m = e.shape[0]
    gs, gi, gj, ims, ii, ij = [], [], [], [], [], []
    for a in range(0, m, block):
        b = min(a + block, m)
        s = e[a:b] @ e.T
        r, c = np.nonzero(np.arange(a, b)[:, None] < np.arange(m)[None, :])  # upper triangle
        same = labels[a + r] == labels[c]
        vals = s[r, c]
        gs.append(vals[same]); gi.append(a + r[same]); gj.append(c[same])
        ims.append(vals[~same].astype(np.float32)); ii.append((a + r[~same]).astype(np.int32))
        ij.append(c[~same].astype(np.int32))
    out = {"gen": np.concatenate(gs), "gen_i": np.concatenate(gi), "gen_j": np.concatenate(gj),
           "imp": np.concatenate(ims).astype(np.float64), "imp_i": np.concatenate(ii).astype(np.int64),
           "imp_j": np.concatenate(ij).astype(np.int64)}
    if max_impostors is not None and out["imp"].size > max_impostors:
        keep = np.sort(np.random.default_rng(seed).choice(out["imp"].size, max_impostors, replace=False))
        for k in ("imp", "imp_i", "imp_j"):
            out[k] = out[k][keep]
    return out


def threshold_at_far(impostor_scores: np.ndarray, far: float) -> float:
    """The smallest threshold ``t`` (accept when ``score > t``) whose false-accept rate is <= ``far``.

    It is the ``(k + 1)``-th largest impostor score with ``k = floor(far * n)``; NaN when
    ``far * n < 1`` (the FAR cannot be measured with ``n`` impostor pairs).
    """
    s = np.asarray(impostor_scores, dtype=np.float64)
    n = s.size
    k = int(math.floor(far * n + 1e-9))
    if k < 1:
        return math.nan
    if k >= n:
        return -math.inf
    return float(np.partition(s, n - k - 1)[n - k - 1])


def tar_at_threshold(genuine_scores: np.ndarray, threshold: float) -> float:
    """Fraction of genuine scores above ``threshold`` (NaN for an empty set or a NaN threshold)."""
    g = np.asarray(genuine_scores, dtype=np.float64)
    if g.size == 0 or math.isnan(threshold):
        return math.nan
    return float((g > threshold).mean())


def group_verification(pairs: Mapping[str, np.ndarray], identity: np.ndarray, groups: Mapping[str, np.ndarray],
                       family: Optional[np.ndarray] = None, fars: Sequence[float] = (1e-3, 1e-4)) -> dict[str, float]:
    """TAR overall and per group of identities, at global thresholds, and look-alike impostors.

    Args:
        pairs: :func:`all_pair_scores` output.
        identity: ``[M]`` identity index (``0..n-1``) of each image.
        groups: ``{name: [n] bool}`` identity groups; ``tar_<far>_<name>`` is the TAR over the
            genuine pairs of the group's identities at the threshold of the *whole* impostor set,
            so groups are compared at one operating point.
        family: ``[n]`` family of each identity (``-1`` = none): adds ``fa_lookalike_<far>``, the
            false-accept rate among impostor pairs of two identities of one family at the global
            threshold, ``tar_<far>_vs_lookalike``, the TAR at the threshold set by those pairs
            alone (NaN when too few), and their count ``n_lookalike_impostors``.

    Returns:
        ``{metric: value}`` with ``tar_<far>`` (``far`` written like ``1e-4``), the per-group
        figures, ``n_genuine`` and ``n_impostor``.
    """
    def key(f: float) -> str:
        return f"{f:.0e}".replace("e-0", "e-")

    out: dict[str, float] = {"n_genuine": float(pairs["gen"].size), "n_impostor": float(pairs["imp"].size)}
    gid = identity[pairs["gen_i"]]
    for far in fars:
        thr = threshold_at_far(pairs["imp"], far)
        out[f"tar_{key(far)}"] = tar_at_threshold(pairs["gen"], thr)
        for name, mask in groups.items():
            mask = np.asarray(mask, dtype=bool)
            out[f"tar_{key(far)}_{name}"] = tar_at_threshold(pairs["gen"][mask[gid]], thr)
        if family is not None:
            fa, fb = family[identity[pairs["imp_i"]]], family[identity[pairs["imp_j"]]]
            look = (fa == fb) & (fa >= 0)
            out["n_lookalike_impostors"] = float(look.sum())
            ok = look.any() and not math.isnan(thr)  # no rate at a FAR the impostors cannot measure
            out[f"fa_lookalike_{key(far)}"] = float((pairs["imp"][look] > thr).mean()) if ok else math.nan
            out[f"tar_{key(far)}_vs_lookalike"] = tar_at_threshold(pairs["gen"], threshold_at_far(pairs["imp"][look], far))
    return out


def terciles(values: Sequence[float]) -> np.ndarray:
    """``[n]`` int in {0, 1, 2}: the tercile of each value by rank (ties broken by position)."""
    v = np.asarray(values, dtype=np.float64)
    order = np.argsort(v, kind="stable")
    t = np.empty(v.size, dtype=np.int64)
    t[order] = (np.arange(v.size) * 3) // max(v.size, 1)
    return t


# ------------------------------------------------------------------------------- correlation
def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(x.size, dtype=np.float64)
    i = 0
    while i < x.size:
        j = i
        while j + 1 < x.size and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i:j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    return ranks


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation over the pairs where both are finite (NaN with < 3 such pairs or no spread)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size < 3:
        return math.nan
    x, y = x - x.mean(), y - y.mean()
    den = math.sqrt(float((x * x).sum()) * float((y * y).sum()))
    return float((x * y).sum() / den) if den > 0 else math.nan


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties) over the pairs where both are finite."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3:
        return math.nan
    return pearson(rankdata(x[ok]), rankdata(y[ok]))


def stability(snapshots: Sequence[Sequence[float]]) -> list[float]:
    """Spearman correlation of each snapshot of a per-class statistic with the next one."""
    return [spearman(a, b) for a, b in zip(snapshots[:-1], snapshots[1:])]


# ------------------------------------------------------------------------------- intervals
def bootstrap_ci(values: Sequence[float], *, level: float = 0.95, n_boot: int = 10000, seed: int = 0
                 ) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of ``values``.

    With few values (5 seeds) the percentile bootstrap is too narrow (it cannot see beyond the
    observed values); :func:`paired_difference` reports a t interval next to it.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0 or not np.isfinite(v).all():
        return math.nan, math.nan
    if v.size == 1:
        return float(v[0]), float(v[0])
    idx = np.random.default_rng(seed).integers(0, v.size, size=(n_boot, v.size))
    means = v[idx].mean(axis=1)
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [a, 1.0 - a])
    return float(lo), float(hi)


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Student-t interval of the mean (NaN for fewer than 2 values)."""
    from scipy import stats

    v = np.asarray(values, dtype=np.float64)
    if v.size < 2 or not np.isfinite(v).all():
        return math.nan, math.nan
    half = stats.t.ppf(0.5 + level / 2.0, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size)
    return float(v.mean() - half), float(v.mean() + half)


def sign_test_p(wins: int, losses: int) -> float:
    """Exact two-sided sign-test p-value (ties dropped before calling)."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    p = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return float(min(1.0, 2.0 * p))


def paired_difference(variant: Sequence[float], baseline: Sequence[float], *, level: float = 0.95,
                      n_boot: int = 10000, seed: int = 0) -> dict[str, float]:
    """Statistics of the paired differences ``variant[k] - baseline[k]`` (one per seed).

    Returns:
        ``{"mean", "std", "n", "boot_lo", "boot_hi", "t_lo", "t_hi", "wins", "losses", "sign_p"}``.
    """
    v, b = np.asarray(variant, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if v.shape != b.shape:
        raise ValueError(f"paired values must have the same shape, got {v.shape} and {b.shape}")
    d = v - b
    d = d[np.isfinite(d)]
    wins, losses = int((d > 0).sum()), int((d < 0).sum())
    blo, bhi = bootstrap_ci(d, level=level, n_boot=n_boot, seed=seed)
    tlo, thi = t_interval(d, level)
    return {"mean": float(d.mean()) if d.size else math.nan, "std": float(d.std(ddof=1)) if d.size > 1 else math.nan,
            "n": int(d.size), "boot_lo": blo, "boot_hi": bhi, "t_lo": tlo, "t_hi": thi, "wins": wins,
            "losses": losses, "sign_p": sign_test_p(wins, losses)}

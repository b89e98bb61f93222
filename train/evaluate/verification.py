"""Verification metrics on scored pairs: 10-fold accuracy with the best threshold, ROC, TAR@FAR.

All functions take similarity scores (higher = more likely the same identity, e.g. cosine) and a
boolean ``issame`` per pair, as numpy arrays, and are exact (thresholds are chosen among the
observed scores, not on a grid).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import numpy as np

__all__ = [
    "FAR_GRID",
    "ScoreSummary",
    "VerificationResult",
    "best_threshold",
    "measurable_fars",
    "roc_curve",
    "score_summary",
    "tar_at_far",
    "ten_fold_accuracy",
    "verify_scores",
]

#: The decade grid of false-accept rates ``pfc eval`` reports (where the pair count allows).
FAR_GRID: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def _check(scores: np.ndarray, issame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).ravel()
    issame = np.asarray(issame, dtype=bool).ravel()
    if scores.shape != issame.shape:
        raise ValueError(f"scores ({scores.shape[0]}) and issame ({issame.shape[0]}) differ in length")
    if scores.size == 0:
        raise ValueError("no pairs to evaluate")
    if not np.isfinite(scores).all():
        raise ValueError("non-finite similarity scores (the model produced NaN/inf embeddings)")
    return scores, issame


def best_threshold(scores: np.ndarray, issame: np.ndarray) -> tuple[float, float]:
    """The threshold maximising accuracy of ``score >= t`` -> same.

    Args:
        scores: ``[P]`` similarities.
        issame: ``[P]`` ground truth.

    Returns:
        ``(threshold, accuracy)``; the threshold is the midpoint between the two scores it separates.
    """
    scores, issame = _check(scores, issame)
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], issame[order]
    # Predict "same" for the first k pairs (highest scores), k = 0..P: correct = TP(k) + TN(k).
    tp = np.concatenate([[0], np.cumsum(y)])
    fp = np.concatenate([[0], np.cumsum(~y)])
    tn = (~y).sum() - fp
    correct = tp + tn
    # Only cut between distinct scores: ties must fall on the same side.
    cut_ok = np.concatenate([[True], s[:-1] != s[1:], [True]])
    correct = np.where(cut_ok, correct, -1)
    k = int(np.argmax(correct))
    if k == 0:
        t = s[0] + 1e-6
    elif k == len(s):
        t = s[-1] - 1e-6
    else:
        t = 0.5 * (s[k - 1] + s[k])
    return float(t), float(correct[k] / len(s))


def ten_fold_accuracy(scores: np.ndarray, issame: np.ndarray, folds: int = 10) -> tuple[float, float, float]:
    """LFW protocol: choose the threshold on 9 folds, measure accuracy on the 10th, average.

    Folds are contiguous blocks of pairs (the standard protocol's order).

    Returns:
        ``(mean accuracy, std of fold accuracies, mean threshold)``.
    """
    scores, issame = _check(scores, issame)
    if len(scores) < folds:
        raise ValueError(f"{len(scores)} pairs cannot be split into {folds} folds")
    bounds = np.linspace(0, len(scores), folds + 1).astype(int)
    accs, thrs = [], []
    for f in range(folds):
        test = np.zeros(len(scores), dtype=bool)
        test[bounds[f] : bounds[f + 1]] = True
        t, _ = best_threshold(scores[~test], issame[~test])
        accs.append(float(((scores[test] >= t) == issame[test]).mean()))
        thrs.append(t)
    return float(np.mean(accs)), float(np.std(accs)), float(np.mean(thrs))


def roc_curve(scores: np.ndarray, issame: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False-accept and true-accept rates at every distinct threshold.

    Returns:
        ``(far, tar, thresholds)``, each ``[T]``, thresholds decreasing, far and tar increasing.
    """
    scores, issame = _check(scores, issame)
    n_pos, n_neg = int(issame.sum()), int((~issame).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC needs both same and different pairs")
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], issame[order]
    last = np.concatenate([s[:-1] != s[1:], [True]])  # end of each group of tied scores
    tar = np.cumsum(y)[last] / n_pos
    far = np.cumsum(~y)[last] / n_neg
    return far, tar, s[last]


def tar_at_far(scores: np.ndarray, issame: np.ndarray, fars: Sequence[float]) -> dict[float, float]:
    """True-accept rate at the largest threshold set whose false-accept rate is at most each target.

    A target FAR below ``1 / #negative pairs`` cannot be measured and gives NaN.

    Returns:
        ``{far: tar}``.
    """
    far_c, tar_c, _ = roc_curve(scores, issame)
    n_neg = int((~np.asarray(issame, dtype=bool)).sum())
    out = {}
    for target in fars:
        if target * n_neg < 1.0:
            out[float(target)] = math.nan
            continue
        ok = far_c <= target + 1e-12
        out[float(target)] = float(tar_c[ok].max()) if ok.any() else 0.0
    return out


def measurable_fars(num_negatives: int, fars: Sequence[float] = FAR_GRID) -> tuple[list[float], list[float]]:
    """Splits target FARs into those ``num_negatives`` impostor pairs can measure and the rest.

    A FAR of ``f`` is measurable when at least one false accept is allowed, i.e.
    ``f * num_negatives >= 1`` (at least ``1 / f`` negatives); below that every threshold above
    the highest impostor score gives FAR 0 and the figure would say nothing about ``f``.

    Returns:
        ``(kept, omitted)``, each in the order given.
    """
    kept = [float(f) for f in fars if f * num_negatives >= 1.0]
    omitted = [float(f) for f in fars if f * num_negatives < 1.0]
    return kept, omitted


@dataclass(frozen=True)
class ScoreSummary:
    """Means and spreads of the genuine (same) and impostor (different) pair scores.

    Attributes:
        pos_mean: Mean score of same-identity pairs.
        neg_mean: Mean score of different-identity pairs.
        gap: ``pos_mean - neg_mean`` (the separation the paper's Figure 2 shows).
        pos_std: Standard deviation of the same-identity scores.
        neg_std: Standard deviation of the different-identity scores.
        num_pos: Number of same-identity pairs.
        num_neg: Number of different-identity pairs.
    """

    pos_mean: float
    neg_mean: float
    gap: float
    pos_std: float
    neg_std: float
    num_pos: int
    num_neg: int


def score_summary(scores: np.ndarray, issame: np.ndarray) -> ScoreSummary:
    """Genuine/impostor score statistics of ``[P]`` scores (NaN for a side with no pair)."""
    scores, issame = _check(scores, issame)
    pos, neg = scores[issame], scores[~issame]
    mean = lambda a: float(a.mean()) if a.size else math.nan  # noqa: E731
    std = lambda a: float(a.std()) if a.size else math.nan  # noqa: E731
    return ScoreSummary(pos_mean=mean(pos), neg_mean=mean(neg), gap=mean(pos) - mean(neg), pos_std=std(pos),
                        neg_std=std(neg), num_pos=int(pos.size), num_neg=int(neg.size))


@dataclass
class VerificationResult:
    """Figures for one pair set.

    ``tar`` maps each reported FAR to its TAR; FARs the negative-pair count cannot measure are
    either NaN in ``tar`` (the training loop's convention) or listed in ``omitted_fars`` and
    absent from ``tar`` (``pfc eval``'s).
    """

    name: str
    accuracy: float
    accuracy_std: float
    threshold: float
    tar: dict[float, float] = field(default_factory=dict)
    num_pairs: int = 0
    scores: Optional[ScoreSummary] = None
    omitted_fars: list[float] = field(default_factory=list)

    def summary(self) -> str:
        tars = "  ".join(
            f"TAR@FAR={far:g}: {'n/a' if math.isnan(v) else f'{v:.4f}'}" for far, v in sorted(self.tar.items())
        )
        return f"{self.name}: acc {self.accuracy:.4f} +- {self.accuracy_std:.4f} ({self.num_pairs} pairs)  {tars}"

    def to_dict(self) -> dict:
        """JSON-ready dict (FAR keys as strings like ``"1e-04"``, NaN as ``None``)."""
        out = {
            "name": self.name, "accuracy": self.accuracy, "accuracy_std": self.accuracy_std,
            "threshold": self.threshold, "num_pairs": self.num_pairs,
            "tar_at_far": {f"{far:.0e}": _json_float(v) for far, v in sorted(self.tar.items())},
            "omitted_fars": [f"{far:.0e}" for far in self.omitted_fars],
        }
        if self.scores is not None:
            out.update({k: _json_float(v) for k, v in asdict(self.scores).items()})
        return out


def _json_float(v: float):
    return None if isinstance(v, float) and not math.isfinite(v) else v


def verify_scores(
    scores: np.ndarray, issame: np.ndarray, name: str = "pairs", fars: Sequence[float] = FAR_GRID,
    folds: int = 10,
) -> VerificationResult:
    """Everything ``pfc eval`` reports for scored pairs: k-fold accuracy and threshold, TAR at
    each measurable FAR (the others listed as omitted), genuine/impostor score statistics.

    Args:
        scores: ``[P]`` similarities (cosine).
        issame: ``[P]`` ground truth.
        name: Label of the pair set.
        fars: Target FARs (default: the decade grid 1e-6..1e-1).
        folds: Folds of the accuracy protocol (10 for LFW).

    Returns:
        The :class:`VerificationResult`.
    """
    scores, issame = _check(scores, issame)
    acc, std, thr = ten_fold_accuracy(scores, issame, folds)
    summ = score_summary(scores, issame)
    kept, omitted = measurable_fars(summ.num_neg, fars)
    tar = tar_at_far(scores, issame, kept) if kept else {}
    return VerificationResult(name=name, accuracy=acc, accuracy_std=std, threshold=thr, tar=tar,
                              num_pairs=int(scores.size), scores=summ, omitted_fars=omitted)

"""Verification metrics on scored pairs: 10-fold accuracy with the best threshold, ROC, TAR@FAR.

All functions take similarity scores (higher = more likely the same identity, e.g. cosine) and a
boolean ``issame`` per pair, as numpy arrays, and are exact (thresholds are chosen among the
observed scores, not on a grid).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

__all__ = ["VerificationResult", "best_threshold", "roc_curve", "tar_at_far", "ten_fold_accuracy"]


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


@dataclass
class VerificationResult:
    """Figures for one pair set."""

    name: str
    accuracy: float
    accuracy_std: float
    threshold: float
    tar: dict[float, float] = field(default_factory=dict)
    num_pairs: int = 0

    def summary(self) -> str:
        tars = "  ".join(
            f"TAR@FAR={far:g}: {'n/a' if math.isnan(v) else f'{v:.4f}'}" for far, v in sorted(self.tar.items())
        )
        return f"{self.name}: acc {self.accuracy:.4f} +- {self.accuracy_std:.4f} ({self.num_pairs} pairs)  {tars}"

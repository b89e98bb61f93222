"""Evaluation: verification on LFW-style pairs (also used in the training loop), IJB-style template
verification, the clustering protocol, feature-distribution figures and the ``pfc eval`` report.

Only the light verification metrics are imported here; the other modules (scikit-learn,
matplotlib, onnxruntime behind them) are imported when used.
"""

from .verification import (
    FAR_GRID,
    VerificationResult,
    best_threshold,
    measurable_fars,
    roc_curve,
    score_summary,
    tar_at_far,
    ten_fold_accuracy,
    verify_scores,
)

__all__ = [
    "FAR_GRID",
    "VerificationResult",
    "best_threshold",
    "measurable_fars",
    "roc_curve",
    "score_summary",
    "tar_at_far",
    "ten_fold_accuracy",
    "verify_scores",
]

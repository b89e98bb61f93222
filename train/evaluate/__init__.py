"""Evaluation: verification metrics (LFW-style pairs), and the helpers the trainer calls in the loop."""

from .verification import VerificationResult, best_threshold, roc_curve, tar_at_far, ten_fold_accuracy

__all__ = ["VerificationResult", "best_threshold", "roc_curve", "tar_at_far", "ten_fold_accuracy"]

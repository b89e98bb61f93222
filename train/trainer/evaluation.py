"""Evaluation on the verification pair sets and the backbone's export, both on rank 0 of a run."""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger("train.trainer")

__all__ = ["evaluate_pair_sets", "export_backbone"]


def evaluate_pair_sets(module: torch.nn.Module, pair_sets: list, cfg, device: torch.device, amp_dtype,
                       step: int, metrics) -> dict[str, dict]:
    """Evaluates ``module`` on every pair set (rank 0 only); returns ``{set: figures}``."""
    from ..evaluate.runner import evaluate_pair_set

    e = cfg.evaluation
    results: dict[str, dict] = {}
    was_training = module.training
    module.eval()
    try:
        for ps in pair_sets:
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32):
                r = evaluate_pair_set(module, ps, device, e.batch_size, e.flip_test, e.far_targets, folds=e.folds)
            log.info("eval step %d %s", step, r.summary())
            tar = {f"{k:g}": v for k, v in r.tar.items()}
            results[r.name] = {"accuracy": r.accuracy, "accuracy_std": r.accuracy_std,
                               "threshold": r.threshold, "tar": tar, "step": step}
            metrics.record_eval(r.name, {"accuracy": r.accuracy, "tar": dict(r.tar)}, step=step)
    finally:
        module.train(was_training)
    return results


def export_backbone(module: torch.nn.Module, cfg, run_dir, step: int) -> dict[str, Any]:
    """Writes the backbone (state dict, and ONNX when enabled) and checks ONNX parity (rank 0)."""
    from ..export import check_onnx, export_onnx, export_state_dict

    x, b, size = cfg.export, cfg.backbone, cfg.data.image_size
    out: dict[str, Any] = {}
    meta = {"backbone": b.name, "embedding_size": b.num_features, "step": step}
    export_dir = run_dir / "export"
    out["state_dict"] = str(export_state_dict(module, export_dir / "backbone.pt", meta))
    if x.onnx:
        path = export_onnx(module, export_dir / x.output_name, embedding_size=b.num_features,
                           backbone_name=b.name, opset=x.opset, image_size=size)
        out["onnx"] = str(path)
        out["onnx_max_abs_diff"] = check_onnx(module, path, batch=5, image_size=size)
        log.info("ONNX %s: max |onnxruntime - torch| = %.2e at batch 5", path, out["onnx_max_abs_diff"])
    return out

"""Backbone export: a plain PyTorch state dict and ONNX with a dynamic batch, checked by onnxruntime.

The ONNX file carries metadata so a deployment knows how to feed it without reading our code:
embedding size, input layout and size, the input normalisation, and the backbone name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

__all__ = ["ExportResult", "export_state_dict", "export_onnx", "check_onnx"]

INPUT_NORMALIZATION = "(x - 127.5) / 127.5 on RGB uint8 pixels"


@dataclass(frozen=True)
class ExportResult:
    """Where the files went and how well ONNX matched PyTorch."""

    onnx_path: Optional[Path]
    state_dict_path: Optional[Path]
    max_abs_diff: Optional[float]
    check_batch: Optional[int]


def export_state_dict(backbone: nn.Module, path: str | Path, metadata: dict) -> Path:
    """Writes ``{"state_dict": ..., "metadata": ...}`` (loadable with ``weights_only=True``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in backbone.state_dict().items()}
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"state_dict": state, "metadata": {k: str(v) for k, v in metadata.items()}}, tmp)
    tmp.replace(path)
    return path


def _images(batch: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=g) * 2 - 1


def export_onnx(
    backbone: nn.Module,
    path: str | Path,
    *,
    embedding_size: int,
    backbone_name: str,
    image_size: int = 112,
    opset: Optional[int] = None,
    export_batch: int = 2,
) -> Path:
    """Exports the backbone (eval mode, fp32, CPU copy) to ONNX with a dynamic batch dimension.

    Args:
        backbone: The (unwrapped) backbone; it is not modified.
        path: Output ``.onnx`` path.
        embedding_size: Its output dimension (stored as metadata).
        backbone_name: Registry name (metadata).
        image_size: Input side.
        opset: ONNX opset (exporter default when ``None``).
        export_batch: Batch size of the tracing example (the exported batch is dynamic).

    Returns:
        The path written.
    """
    import copy

    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(backbone).float().cpu().eval()
    model = model.to(memory_format=torch.contiguous_format)
    example = _images(export_batch, image_size, 0)
    # The input's argument name is whatever the backbone's forward calls it.
    import inspect

    arg = next(iter(inspect.signature(model.forward).parameters))
    kwargs = dict(input_names=["images"], output_names=["embeddings"], dynamo=True, external_data=False,
                  dynamic_shapes={arg: {0: torch.export.Dim("batch", min=1, max=65536)}}, verbose=False)
    if opset is not None:
        kwargs["opset_version"] = opset
    tmp = path.with_suffix(".tmp.onnx")
    import logging
    import warnings

    # The exporter's optimiser passes log every rewrite at INFO; a training log does not need them.
    quiet = [logging.getLogger(n) for n in ("onnx_ir", "onnxscript", "torch.onnx")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.onnx.export(model, (example,), str(tmp), **kwargs)
    finally:
        for lg, lv in zip(quiet, levels):
            lg.setLevel(lv)
    proto = onnx.load(str(tmp))
    meta = {
        "embedding_size": str(embedding_size),
        "input_shape": json.dumps(["batch", 3, image_size, image_size]),
        "input_layout": "NCHW RGB",
        "input_normalization": INPUT_NORMALIZATION,
        "backbone": backbone_name,
        "producer": "partial-fc",
    }
    del proto.metadata_props[:]
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(proto, str(path))
    tmp.unlink(missing_ok=True)
    return path


def check_onnx(backbone: nn.Module, path: str | Path, batch: int = 5, image_size: int = 112) -> float:
    """Max absolute difference between onnxruntime and PyTorch (eval, fp32) at ``batch``.

    Use a batch different from the export batch: that is what proves the batch is dynamic.
    """
    import copy

    import onnxruntime as ort

    model = copy.deepcopy(backbone).float().cpu().eval()
    x = _images(batch, image_size, 1)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    if got.shape != want.shape:
        raise RuntimeError(f"ONNX output shape {got.shape} differs from PyTorch {want.shape}")
    return float(np.abs(got - want).max())

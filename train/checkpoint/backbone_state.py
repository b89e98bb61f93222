"""The backbone out of a checkpoint, without the head: for ONNX export, evaluation and fine-tuning.

Reads only ``backbone.pt`` (sha256-checked, ``weights_only``) of a checkpoint directory, or of the
newest complete checkpoint under a checkpoint root.
"""

from __future__ import annotations

from pathlib import Path

from .format import BACKBONE_FILE, MANIFEST, _STEP_RE, CheckpointError, PathLike, _load
from .reader import find_latest, read_manifest
from .state import _strip_module_prefix


def export_backbone_state(path_ckpt: PathLike, verify: bool = True) -> dict:
    """The backbone's weights alone (unwrapped ``state_dict``), e.g. for ONNX export or evaluation.

    Args:
        path_ckpt: A checkpoint directory, or a checkpoint root (its newest complete checkpoint).
        verify: Check ``backbone.pt`` against its sha256 first.

    Returns:
        The backbone ``state_dict`` (CPU tensors, no ``module.`` prefixes).

    Raises:
        CheckpointError: No checkpoint found, or it holds no backbone.
    """
    return load_backbone_and_extra(path_ckpt, verify)[0]


def load_backbone_and_extra(path_ckpt: PathLike, verify: bool = True) -> tuple[dict, dict]:
    """The backbone's weights and the trainer's ``extra_state`` (backbone name, embedding size, ...).

    Args:
        path_ckpt: A checkpoint directory, or a checkpoint root (its newest complete checkpoint).
        verify: Check ``backbone.pt`` against its sha256 first.

    Returns:
        ``(state_dict, extra_state)``; the state dict has CPU tensors and no ``module.`` prefixes.

    Raises:
        CheckpointError: No checkpoint found, or it holds no backbone.
    """
    path = Path(path_ckpt)
    if not (path / MANIFEST).is_file() and not _STEP_RE.match(path.name):
        latest = find_latest(path)
        if latest is None:
            raise CheckpointError(f"no complete checkpoint under {path}")
        path = latest
    manifest = read_manifest(path)
    bb = _load(path, manifest, BACKBONE_FILE, verify, mmap=False)
    if bb["model"] is None:
        raise CheckpointError(f"{path} was saved without a backbone")
    return _strip_module_prefix(bb["model"]), dict(bb.get("extra") or {})

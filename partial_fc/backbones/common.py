"""Building blocks shared by several backbones."""

from __future__ import annotations

import contextlib

import torch
from torch import nn


class EmbeddingNeck(nn.Module):
    """Final ``Linear -> BatchNorm1d`` that produces the embedding, always in full precision.

    The margin losses (ArcFace/CosFace) normalise the embedding and the class centres, and the
    embedding's norm is used as a quality signal by some losses; in fp16/bf16 the linear layer's
    large reduction (e.g. 25088 inputs for iResNet) loses enough precision to distort both the
    direction and the norm, and BatchNorm1d statistics in half precision are fragile. The neck
    is a tiny fraction of the FLOPs, so it runs outside autocast.

    Args:
        in_features: Size of the flattened input.
        num_features: Embedding size.

    Shape:
        - Input: ``[B, in_features]`` of any floating dtype.
        - Output: ``[B, num_features]`` in the dtype of the neck's weights (float32 unless the
          whole model was cast, e.g. by a DeepSpeed fp16 engine).
    """

    def __init__(self, in_features: int, num_features: int) -> None:
        super().__init__()
        # No bias: the BatchNorm1d right after subtracts the batch mean, so a bias would get
        # exactly zero gradient in training and only shift the output in evaluation.
        self.fc = nn.Linear(in_features, num_features, bias=False)
        self.bn = nn.BatchNorm1d(num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type
        # Devices without autocast support (e.g. "meta", used for cheap shape/parameter checks)
        # cannot be under autocast either, so there is nothing to disable there.
        ctx = (
            torch.autocast(device_type=device_type, enabled=False)
            if torch.amp.is_autocast_available(device_type)
            else contextlib.nullcontext()
        )
        with ctx:
            # Follow the weights' dtype rather than hard-coding float32: under autocast the
            # weights are fp32 (so this is a cast to float), and a model cast wholesale to half
            # precision still runs instead of failing on a dtype mismatch.
            x = x.to(self.fc.weight.dtype)
            return self.bn(self.fc(x))


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zeroes whole samples of a residual branch with probability ``p``.

    Args:
        x: Residual branch output, ``[B, ...]``.
        p: Drop probability.
        training: Identity when False.

    Returns:
        Tensor of the same shape; kept samples are scaled by ``1 / (1 - p)`` so that the
        expectation matches evaluation mode.
    """
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class DropPath(nn.Module):
    """Module wrapper of :func:`drop_path`.

    Args:
        p: Drop probability of the residual branch, per sample.
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Counts parameters of ``model``.

    Args:
        model: Any module.
        trainable_only: Count only parameters with ``requires_grad``.

    Returns:
        The number of scalar parameters.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)

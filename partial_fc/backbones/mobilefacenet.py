"""MobileFaceNet: a ~1M-parameter mobile backbone for 112x112 faces.

Inverted-residual (MobileNetV2-style) blocks with PReLU, and a *global depthwise convolution*
(GDC) instead of global average pooling: a 7x7 depthwise kernel gives every spatial position of
the aligned face its own learned weight, which average pooling would throw away.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .common import EmbeddingNeck
from .registry import register_backbone

# (expansion t, output channels c, repeats n, stride of the first repeat s), from the paper.
_BLOCKS: tuple[tuple[int, int, int, int], ...] = (
    (2, 64, 5, 2),
    (4, 128, 1, 2),
    (2, 128, 6, 1),
    (4, 128, 1, 2),
    (2, 128, 2, 1),
)


def _round(channels: float, divisor: int = 8) -> int:
    # Multiples of 8 keep vectorised conv kernels efficient after width scaling.
    return max(divisor, int(channels + divisor / 2) // divisor * divisor)


class ConvBN(nn.Module):
    """``Conv2d -> BatchNorm2d -> optional PReLU``.

    Args:
        cin: Input channels.
        cout: Output channels.
        kernel: Square kernel size; padding keeps the size at stride 1 unless ``padding`` is
            given.
        stride: Convolution stride.
        groups: Convolution groups (``cin`` for depthwise).
        act: Append a PReLU; False gives a *linear* bottleneck/projection.
        padding: Explicit padding (default ``kernel // 2``).

    Shape:
        ``[B, cin, H, W] -> [B, cout, H', W']``.
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int = 1,
        stride: int = 1,
        groups: int = 1,
        act: bool = True,
        padding: int | None = None,
    ) -> None:
        super().__init__()
        pad = kernel // 2 if padding is None else padding
        self.conv = nn.Conv2d(cin, cout, kernel, stride, pad, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.PReLU(cout) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """Inverted residual: 1x1 expand -> 3x3 depthwise (stride) -> 1x1 linear projection.

    The projection has no activation because a non-linearity in the narrow space destroys
    information (the MobileNetV2 "linear bottleneck" argument).

    Args:
        cin: Input channels.
        cout: Output channels.
        stride: Depthwise stride; the residual is used only when ``stride == 1`` and
            ``cin == cout``.
        expansion: Width multiplier of the hidden layer.

    Shape:
        ``[B, cin, H, W] -> [B, cout, H / stride, W / stride]``.
    """

    def __init__(self, cin: int, cout: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = cin * expansion
        self.use_residual = stride == 1 and cin == cout
        self.body = nn.Sequential(
            ConvBN(cin, hidden, 1),
            ConvBN(hidden, hidden, 3, stride, groups=hidden),
            ConvBN(hidden, cout, 1, act=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return x + out if self.use_residual else out


class MobileFaceNet(nn.Module):
    """MobileFaceNet with a GDC head and an fp32 embedding neck.

    Args:
        num_features: Embedding size.
        width_mult: Multiplier on every channel count (rounded to multiples of 8).
        blocks: Bottleneck configuration ``(t, c, n, s)`` per group.
        last_channels: Channels of the 1x1 conv before the GDC (scaled by ``width_mult``).
        dropout: Dropout before the neck's linear layer.
        input_size: Side of the square input; fixes the GDC kernel size (``input_size / 16``).

    Shape:
        - Input: ``[B, 3, input_size, input_size]``, contiguous or channels_last.
        - Output: ``[B, num_features]``; float32 (the neck runs outside autocast).
    """

    def __init__(
        self,
        num_features: int = 512,
        width_mult: float = 1.0,
        blocks: Sequence[tuple[int, int, int, int]] = _BLOCKS,
        last_channels: int = 512,
        dropout: float = 0.0,
        input_size: int = 112,
    ) -> None:
        super().__init__()
        stem = _round(64 * width_mult)
        layers: list[nn.Module] = [
            ConvBN(3, stem, 3, stride=2),
            ConvBN(stem, stem, 3, groups=stem),
        ]
        cin = stem
        for t, c, n, s in blocks:
            cout = _round(c * width_mult)
            for i in range(n):
                layers.append(Bottleneck(cin, cout, s if i == 0 else 1, t))
                cin = cout
        last = _round(last_channels * width_mult)
        layers.append(ConvBN(cin, last, 1))
        self.features = nn.Sequential(*layers)
        side = input_size // 16
        # GDC: one kxk filter per channel over the whole map, linear (no activation).
        self.gdc = ConvBN(last, last, side, groups=last, act=False, padding=0)
        self.dropout = nn.Dropout(p=dropout)
        self.neck = EmbeddingNeck(last, num_features)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Computes embeddings.

        Args:
            x: ``[B, 3, 112, 112]`` normalised images.

        Returns:
            ``[B, num_features]`` float32 embeddings (not L2-normalised).
        """
        x = self.gdc(self.features(x))  # [B, C, 1, 1]
        x = torch.flatten(x, 1)
        x = self.dropout(x)
        return self.neck(x)


@register_backbone("mobilefacenet")
def mobilefacenet(
    num_features: int = 512, width_mult: float = 1.0, dropout: float = 0.0
) -> MobileFaceNet:
    """Standard MobileFaceNet (about 1.2M parameters with ``num_features=512``).

    Args:
        num_features: Embedding size.
        width_mult: Channel multiplier, e.g. 0.5 or 2.0.
        dropout: Dropout before the embedding layer.

    Returns:
        MobileFaceNet mapping ``[B, 3, 112, 112] -> [B, num_features]``.
    """
    return MobileFaceNet(num_features=num_features, width_mult=width_mult, dropout=dropout)

"""Improved ResNet (iResNet) for 112x112 face crops, as used by ArcFace.

Differences from the ImageNet ResNet, all aimed at small aligned faces:

* 3x3 stride-1 stem without max-pooling, so the first stage sees 112x112 and the last 7x7;
* pre-activation-style residual block ``BN-conv3x3-BN-PReLU-conv3x3(stride)-BN`` with PReLU;
* no global pooling: the 7x7 map is flattened into a fully-connected layer, because the
  faces are aligned and *where* a feature fires carries identity information.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .common import EmbeddingNeck
from .registry import register_backbone

_DEPTHS: dict[int, tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),
    200: (6, 26, 60, 6),
}

def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """iResNet residual block: ``BN-conv3x3-BN-PReLU-conv3x3(stride)-BN`` + shortcut.

    Args:
        in_channels: Input channels.
        channels: Output channels.
        stride: Stride of the second convolution (and of the shortcut projection).

    Shape:
        ``[B, in_channels, H, W] -> [B, channels, H / stride, W / stride]``.
    """

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = _conv3x3(in_channels, channels)
        self.bn2 = nn.BatchNorm2d(channels)
        self.prelu = nn.PReLU(channels)
        self.conv2 = _conv3x3(channels, channels, stride)
        self.bn3 = nn.BatchNorm2d(channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn1(x)
        out = self.conv1(out)
        out = self.bn2(out)
        out = self.prelu(out)
        out = self.conv2(out)
        out = self.bn3(out)
        return out + identity


class IResNet(nn.Module):
    """iResNet backbone with a flatten-FC embedding neck.

    Args:
        layers: Number of blocks per stage.
        widths: Channels per stage (same length as ``layers``).
        num_features: Embedding size.
        dropout: Dropout probability before the neck's linear layer.
        zero_init_residual: Initialise each block's last BN weight to zero so every block
            starts as the identity; helps the deepest variants start training stably.
        stem_width: Channels of the stem convolution.
        stem_stride: Stride of the stem; 1 for the ArcFace models, 2 for the cheap demo
            variant (quarter of the spatial work in every stage).
        input_size: Side of the square input; fixes the size of the flattened feature map.

    Shape:
        - Input: ``[B, 3, input_size, input_size]``, contiguous or channels_last.
        - Output: ``[B, num_features]``; float32 (the neck runs outside autocast).
    """

    def __init__(
        self,
        layers: Sequence[int],
        widths: Sequence[int] = (64, 128, 256, 512),
        num_features: int = 512,
        dropout: float = 0.0,
        zero_init_residual: bool = False,
        stem_width: int = 64,
        stem_stride: int = 1,
        input_size: int = 112,
    ) -> None:
        super().__init__()
        if len(layers) != 4 or len(widths) != 4:
            raise ValueError(f"expected 4 stages, got layers={list(layers)} widths={list(widths)}")
        self.conv1 = _conv3x3(3, stem_width, stem_stride)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.prelu = nn.PReLU(stem_width)
        stages = []
        cin = stem_width
        side = (input_size - 1) // stem_stride + 1
        for n, width in zip(layers, widths):
            blocks = [IBasicBlock(cin, width, stride=2)]
            blocks += [IBasicBlock(width, width) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = width
            side = (side - 1) // 2 + 1
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn2 = nn.BatchNorm2d(cin)
        self.dropout = nn.Dropout(p=dropout)
        self.neck = EmbeddingNeck(cin * side * side, num_features)
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
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
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, IBasicBlock):
                    nn.init.zeros_(m.bn3.weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Runs the convolutional trunk.

        Args:
            x: ``[B, 3, 112, 112]`` images.

        Returns:
            ``[B, C, 7, 7]`` feature map (``C = widths[-1]``), after the final BN.
        """
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.bn2(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Computes embeddings.

        Args:
            x: ``[B, 3, 112, 112]`` normalised images.

        Returns:
            ``[B, num_features]`` float32 embeddings (not L2-normalised).
        """
        x = self.forward_features(x)
        # flatten() of a channels_last map would silently reorder features relative to a
        # contiguous one; make the layout canonical so both give identical embeddings.
        x = torch.flatten(x.contiguous(), 1)
        x = self.dropout(x)
        return self.neck(x)


def _make(depth: int):
    def factory(
        num_features: int = 512, dropout: float = 0.0, zero_init_residual: bool = False
    ) -> IResNet:
        return IResNet(
            _DEPTHS[depth],
            num_features=num_features,
            dropout=dropout,
            zero_init_residual=zero_init_residual,
        )

    factory.__name__ = f"iresnet{depth}"
    factory.__doc__ = (
        f"iResNet-{depth} (stages {list(_DEPTHS[depth])}, widths 64/128/256/512).\n\n"
        "Args:\n"
        "    num_features: Embedding size.\n"
        "    dropout: Dropout before the embedding layer.\n"
        "    zero_init_residual: Zero-init each block's last BN.\n\n"
        "Returns:\n"
        "    IResNet mapping [B, 3, 112, 112] -> [B, num_features].\n"
    )
    return factory


iresnet18 = register_backbone("r18")(_make(18))
iresnet34 = register_backbone("r34")(_make(34))
iresnet50 = register_backbone("r50")(_make(50))
iresnet100 = register_backbone("r100")(_make(100))
iresnet200 = register_backbone("r200")(_make(200))


@register_backbone("iresnet_nano")
def iresnet_nano(
    num_features: int = 512, dropout: float = 0.0, zero_init_residual: bool = False, input_size: int = 112
) -> IResNet:
    """Tiny iResNet for CPU demos and tests.

    Same block and neck as the ArcFace iResNets, but a stride-2 stem (the trunk starts at 56x56
    and ends at 4x4), a 16-channel stem and one block per stage with widths 16/32/48/96, so a
    2-core CPU trains it at a few hundred images per second (see docs/backbones.md). Accuracy
    is far below r50; it exists to make end-to-end runs cheap, not to be deployed.

    Args:
        num_features: Embedding size.
        dropout: Dropout before the embedding layer.
        zero_init_residual: Zero-init each block's last BN.
        input_size: Side of the square input (56 makes a 4x cheaper model for CPU studies:
            the trunk starts at 28x28).

    Returns:
        IResNet mapping ``[B, 3, input_size, input_size] -> [B, num_features]``.
    """
    return IResNet(
        (1, 1, 1, 1),
        # The first stage runs at 56x56 and dominates the cost, so it is kept narrow. Nothing
        # is narrower than 16 channels: oneDNN's 1x1 stride-2 convolution backward with
        # channels_last and fewer input channels than its SIMD block (8 or 16) corrupts the
        # heap (seen here with torch 2.13 CPU; uxlfoundation/oneDNN#6035), and every
        # downsample shortcut is exactly such a convolution.
        widths=(16, 32, 48, 96),
        num_features=num_features,
        dropout=dropout,
        zero_init_residual=zero_init_residual,
        stem_width=16,
        stem_stride=2,
        input_size=input_size,
    )

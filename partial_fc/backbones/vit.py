"""Vision Transformer for 112x112 faces.

Design (see docs/backbones.md for the reasoning):

* patch size 9 -> a 12x12 grid of 144 tokens (the last 4 pixel rows/columns, background at
  the crop border, are not covered);
* learned absolute position embeddings, no class token;
* pre-norm blocks (LayerNorm -> attention / MLP -> residual) with optional stochastic depth;
* a *feature head* ``LayerNorm -> flatten(all 144 tokens) -> Linear -> BatchNorm1d`` instead of
  a class-token read-out, mirroring iResNet's flatten-FC over its 7x7 map: aligned faces make
  token position meaningful, so the head keeps it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import DropPath, EmbeddingNeck
from .registry import register_backbone


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch x patch`` convolution producing a token sequence.

    Args:
        dim: Token width.
        patch: Patch side in pixels.

    Shape:
        ``[B, 3, H, W] -> [B, (H // patch) * (W // patch), dim]``.
    """

    def __init__(self, dim: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # [B, dim, h, w]
        return x.flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention over all tokens (no mask) via ``scaled_dot_product_attention``.

    Args:
        dim: Token width; must be divisible by ``heads``.
        heads: Number of heads.
        attn_drop: Dropout on attention weights (training only).
        proj_drop: Dropout after the output projection.

    Shape:
        ``[B, N, dim] -> [B, N, dim]``.
    """

    def __init__(self, dim: int, heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        # Held as a module (not a float) so that, like every other dropout, it follows the
        # train/eval state of an nn.Dropout; SDPA applies it inside the fused kernel.
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [B, heads, N, head_dim]
        x = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_drop.p if self.attn_drop.training else 0.0
        )
        x = x.transpose(1, 2).reshape(b, n, d)
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    """Two-layer GELU MLP.

    Args:
        dim: Token width.
        hidden: Hidden width.
        drop: Dropout after each layer.

    Shape:
        ``[B, N, dim] -> [B, N, dim]``.
    """

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + DropPath(Attn(LN(x)))``, ``x + DropPath(MLP(LN(x)))``.

    Args:
        dim: Token width.
        heads: Attention heads.
        mlp_ratio: MLP hidden width / ``dim``.
        drop_path: Stochastic-depth probability of both residual branches.
        dropout: Dropout inside attention projection and MLP.
        attn_drop: Dropout on attention weights.

    Shape:
        ``[B, N, dim] -> [B, N, dim]``.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        dropout: float = 0.0,
        attn_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, attn_drop, dropout)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class FaceViT(nn.Module):
    """ViT backbone with a flatten-all-tokens feature head.

    Args:
        dim: Token width.
        depth: Number of blocks.
        heads: Attention heads.
        num_features: Embedding size.
        patch: Patch side in pixels.
        input_size: Side of the square input.
        mlp_ratio: MLP hidden width / ``dim``.
        drop_path_rate: Stochastic depth of the last block; earlier blocks get linearly less
            (deeper blocks are more redundant, so they can be dropped more often).
        dropout: Dropout in attention projection, MLP, and before the head's linear layer.
        attn_drop: Dropout on attention weights.

    Shape:
        - Input: ``[B, 3, input_size, input_size]``, contiguous or channels_last.
        - Output: ``[B, num_features]``; float32 (the head's Linear+BN runs outside autocast).
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int,
        num_features: int = 512,
        patch: int = 9,
        input_size: int = 112,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        dropout: float = 0.0,
        attn_drop: float = 0.0,
    ) -> None:
        super().__init__()
        side = input_size // patch
        self.num_patches = side * side
        self.patch_embed = PatchEmbed(dim, patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, dim))
        self.pos_drop = nn.Dropout(dropout)
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.Sequential(
            *[Block(dim, heads, mlp_ratio, rates[i], dropout, attn_drop) for i in range(depth)]
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head_drop = nn.Dropout(dropout)
        self.neck = EmbeddingNeck(self.num_patches * dim, num_features)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, nn.BatchNorm1d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Treat the patch conv as the linear layer it is.
        w = self.patch_embed.proj.weight
        nn.init.trunc_normal_(w.view(w.shape[0], -1), std=0.02)
        nn.init.zeros_(self.patch_embed.proj.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Runs patch embedding and the transformer.

        Args:
            x: ``[B, 3, 112, 112]`` images.

        Returns:
            ``[B, num_patches, dim]`` normalised tokens.
        """
        x = self.pos_drop(self.patch_embed(x) + self.pos_embed)
        return self.norm(self.blocks(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Computes embeddings.

        Args:
            x: ``[B, 3, 112, 112]`` normalised images.

        Returns:
            ``[B, num_features]`` float32 embeddings (not L2-normalised).
        """
        x = torch.flatten(self.forward_features(x), 1)
        return self.neck(self.head_drop(x))


_CONFIGS: dict[str, tuple[int, int, int]] = {
    "vit_t": (192, 12, 3),
    "vit_s": (384, 12, 6),
    "vit_b": (768, 12, 12),
    "vit_l": (1024, 24, 16),
}


def _make(name: str):
    dim, depth, heads = _CONFIGS[name]

    def factory(
        num_features: int = 512,
        drop_path_rate: float = 0.0,
        dropout: float = 0.0,
        attn_drop: float = 0.0,
    ) -> FaceViT:
        return FaceViT(
            dim,
            depth,
            heads,
            num_features=num_features,
            drop_path_rate=drop_path_rate,
            dropout=dropout,
            attn_drop=attn_drop,
        )

    factory.__name__ = name
    factory.__doc__ = (
        f"ViT (dim {dim}, depth {depth}, heads {heads}), patch 9 on 112x112 -> 144 tokens.\n\n"
        "Args:\n"
        "    num_features: Embedding size.\n"
        "    drop_path_rate: Stochastic depth of the last block (linear ramp from 0).\n"
        "    dropout: Dropout in blocks and before the head's linear layer.\n"
        "    attn_drop: Dropout on attention weights.\n\n"
        "Returns:\n"
        "    FaceViT mapping [B, 3, 112, 112] -> [B, num_features].\n"
    )
    return factory


vit_t = register_backbone("vit_t")(_make("vit_t"))
vit_s = register_backbone("vit_s")(_make("vit_s"))
vit_b = register_backbone("vit_b")(_make("vit_b"))
vit_l = register_backbone("vit_l")(_make("vit_l"))

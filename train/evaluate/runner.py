"""Verification of a backbone on LFW-layout ``.bin`` pair sets (used in the training loop and by
``pfc eval``).

``.bin`` files are pickles in the wild; they are read only through
``dali_pipelines.load_verification_bin``, whose restricted unpickler accepts lists of bytes and
booleans and rejects anything else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .verification import VerificationResult, score_summary, tar_at_far, ten_fold_accuracy

__all__ = ["PairSet", "load_pair_set", "embed_images", "evaluate_pair_set", "pair_scores"]


class PairSet:
    """Decoded images of a pair set: ``images [2P, 3, S, S]`` uint8 and ``issame [P]``."""

    def __init__(self, name: str, images: torch.Tensor, issame: np.ndarray) -> None:
        if images.shape[0] != 2 * len(issame):
            raise ValueError(f"{name}: {images.shape[0]} images for {len(issame)} pairs (need two per pair)")
        self.name, self.images, self.issame = name, images, np.asarray(issame, dtype=bool)


def load_pair_set(path: str | Path, image_size: int = 112) -> PairSet:
    """Reads and decodes a ``.bin`` pair set (safe loader) into uint8 CHW tensors.

    Raises:
        dali_pipelines.UnsafePickleError: The file contains anything but image bytes and flags.
    """
    from dali_pipelines import load_verification_bin
    from dali_pipelines.decode import fit_size, get_decoder

    path = Path(path)
    blobs, issame = load_verification_bin(path)
    if len(blobs) == 0 or len(issame) == 0:
        raise ValueError(f"{path}: the .bin holds {len(blobs)} images and {len(issame)} pair labels; "
                         "an empty pair set cannot be evaluated (is the file truncated?)")
    decode = get_decoder("auto")
    arr = np.stack([fit_size(decode(b), image_size) for b in blobs])
    images = torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
    return PairSet(path.stem, images, issame)


@torch.no_grad()
def embed_images(
    model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, device: torch.device,
    batch_size: int = 256, flip: bool = False, dtype: torch.dtype = torch.float32,
    mean: float = 127.5, std: float = 127.5, normalize: bool = True,
) -> torch.Tensor:
    """Embeddings of uint8 ``[N, 3, S, S]`` images, fed as ``(x - mean) / std``.

    With ``flip``, the embedding is the sum of the image's and its mirror's raw embeddings
    (flip-test fusion), normalised once when ``normalize``.

    Returns:
        ``[N, D]`` fp32 on CPU: L2-normalised, or the raw (fused) features with
        ``normalize=False`` (IJB's norm-aware aggregation needs their norms).
    """
    out = []
    for i in range(0, images.shape[0], batch_size):
        x = images[i : i + batch_size].to(device).float().sub_(mean).div_(std).to(dtype)
        e = model(x).float()
        if flip:
            e = e + model(torch.flip(x, dims=[3])).float()
        out.append(F.normalize(e, dim=1).cpu() if normalize else e.cpu())
    return torch.cat(out)


def evaluate_pair_set(
    model: Callable[[torch.Tensor], torch.Tensor], pairs: PairSet, device: torch.device,
    batch_size: int = 256, flip: bool = False, fars: Sequence[float] = (1e-3, 1e-4),
    dtype: torch.dtype = torch.float32, folds: int = 10,
) -> VerificationResult:
    """k-fold (default 10) accuracy and TAR@FAR of ``model`` on a pair set (cosine scores)."""
    emb = embed_images(model, pairs.images, device, batch_size, flip, dtype)
    scores = pair_scores(emb)
    acc, std, thr = ten_fold_accuracy(scores, pairs.issame, folds)
    return VerificationResult(
        name=pairs.name, accuracy=acc, accuracy_std=std, threshold=thr,
        tar=tar_at_far(scores, pairs.issame, fars), num_pairs=len(pairs.issame),
        scores=score_summary(scores, pairs.issame),
    )


def pair_scores(embeddings: torch.Tensor) -> np.ndarray:
    """Cosine scores of consecutive rows: pair ``i`` is rows ``2i`` and ``2i+1``.

    Args:
        embeddings: ``[2P, D]`` L2-normalised embeddings in the ``.bin`` order.

    Returns:
        ``[P]`` float64 scores.
    """
    if embeddings.dim() != 2 or embeddings.shape[0] % 2:
        raise ValueError(f"need [2P, D] embeddings (two per pair), got {tuple(embeddings.shape)}")
    e = embeddings.double()
    return (e[0::2] * e[1::2]).sum(1).numpy()

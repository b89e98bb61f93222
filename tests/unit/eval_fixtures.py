"""Evaluation fixtures in the released formats, generated here (never downloaded).

Loose crops are made the way a detector's output relates to an aligned face: an aligned synthetic
face (``dali_pipelines.synth.render_face``, whose landmarks are by construction the ArcFace
template) is warped into a larger canvas by a known similarity transform, and the template points
are moved with it. Aligning the loose crop with the moved points must give the face back.
"""

from __future__ import annotations

import math

import numpy as np

from dali_pipelines.align import ARCFACE_TEMPLATE_112


def similarity(scale: float, angle_deg: float, tx: float, ty: float) -> np.ndarray:
    """``[2, 3]`` matrix of ``x -> scale * R(angle) x + t``."""
    a = math.radians(angle_deg)
    c, s = math.cos(a), math.sin(a)
    return np.array([[scale * c, -scale * s, tx], [scale * s, scale * c, ty]])


def aligned_face(gid: int, k: int = 0, seed: int = 0, smooth: float = 1.5) -> np.ndarray:
    """A 112x112 RGB synthetic face of identity ``gid`` (image ``k``), Gaussian-smoothed by
    ``smooth`` pixels: the renderer adds per-pixel sensor noise, which no resampling preserves,
    while real aligned crops are band-limited by the lens and the detector's upsampling."""
    from skimage.filters import gaussian

    from dali_pipelines.synth import identity_params, render_face

    face = render_face(identity_params(seed, gid), np.random.default_rng([seed, 7, gid, k]), 112)
    if smooth > 0:
        face = gaussian(face.astype(np.float64), sigma=smooth, channel_axis=-1, preserve_range=True)
        face = np.clip(np.rint(face), 0, 255).astype(np.uint8)
    return face


def placed(scale: float, angle_deg: float, margin: tuple[int, int] = (20, 30)) -> tuple[np.ndarray, tuple[int, int]]:
    """A similarity (scale, rotation) with the translation that puts the whole transformed
    112x112 square inside a canvas with ``margin = (left/right, top/bottom)`` pixels around it;
    returns ``(matrix, canvas (H, W))``."""
    m = similarity(scale, angle_deg, 0.0, 0.0)
    corners = np.array([[-0.5, -0.5], [111.5, -0.5], [-0.5, 111.5], [111.5, 111.5]]) @ m[:, :2].T
    lo, hi = corners.min(0), corners.max(0)
    m[:, 2] = np.array(margin, dtype=float) - lo
    w, h = np.ceil(hi - lo + 2 * np.array(margin)).astype(int)
    return m, (int(h), int(w))


def loose_crop(face: np.ndarray, matrix: np.ndarray, canvas: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Warps an aligned face into a ``canvas = (H, W)`` image by ``matrix`` (aligned -> loose
    coordinates) and returns ``(image [H, W, 3] uint8, landmarks [5, 2])``.

    The warp is scikit-image's (an independent library from the OpenCV warp under test), with a
    grey background so the face edge is visible.
    """
    from skimage.transform import AffineTransform, warp

    m3 = np.vstack([matrix, [0, 0, 1]])
    inv = AffineTransform(matrix=np.linalg.inv(m3))  # output (loose) -> input (aligned) coordinates
    out = warp(face.astype(np.float64), inv, output_shape=canvas, order=1, mode="constant", cval=90.0,
               preserve_range=True)
    lm = ARCFACE_TEMPLATE_112 @ matrix[:, :2].T + matrix[:, 2]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8), lm

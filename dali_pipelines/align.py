"""Face alignment from 5 landmarks to the standard 112x112 ArcFace template.

The recipe of the public insightface tools (``norm_crop``): estimate the similarity transform
(rotation, uniform scale, translation; no shear, no reflection) that maps the detected landmarks
onto the template in the least-squares sense (Umeyama, 1991), then warp the image with it,
bilinear, black outside the image.

- The estimate is Umeyama's closed form in numpy (:func:`estimate_similarity`); the tests check it
  against scikit-image's ``SimilarityTransform.estimate`` and against known transforms.
- The warp is OpenCV's ``cv2.warpAffine`` (``INTER_LINEAR``, ``BORDER_CONSTANT`` 0), as the
  reference tools use; the tests check it against scikit-image's ``warp``. OpenCV is imported
  only when a face is warped (``pip install 'partial-fc[eval]'``).

Coordinates are pixel coordinates ``(x, y)`` = (column, row) with pixel centres at integers (the
convention of both libraries and of the released landmark files).

Used by ``pfc eval`` (IJB, clustering) and by ``pfc pack --landmarks``; it lives here because
``dali_pipelines`` may not import ``train``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["ARCFACE_TEMPLATE_112", "align_face", "estimate_similarity", "read_landmarks", "transform_points"]

#: The five reference points (x, y) of insightface's 112x112 ArcFace crop, in the order left eye,
#: right eye, nose tip, left mouth corner, right mouth corner (left/right as seen in the image).
#: These are the public constants of the insightface alignment code (``arcface_dst``).
ARCFACE_TEMPLATE_112 = np.array(
    [[38.2946, 51.6963],
     [73.5318, 51.5014],
     [56.0252, 71.7366],
     [41.5493, 92.3655],
     [70.7299, 92.2041]], dtype=np.float64)


def _points(a, what: str) -> np.ndarray:
    p = np.asarray(a, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 2 or p.shape[0] < 2:
        raise ValueError(f"{what} must be [K, 2] points with K >= 2, got shape {p.shape}")
    if not np.isfinite(p).all():
        raise ValueError(f"{what} holds non-finite coordinates: {p.tolist()}")
    return p


def estimate_similarity(src, dst) -> np.ndarray:
    """Least-squares similarity transform mapping ``src`` onto ``dst`` (Umeyama 1991).

    Args:
        src: ``[K, 2]`` points (e.g. detected landmarks), ``K >= 2``.
        dst: ``[K, 2]`` target points (e.g. :data:`ARCFACE_TEMPLATE_112`).

    Returns:
        ``[2, 3]`` float64 matrix ``M`` with ``dst ~ M[:, :2] @ src + M[:, 2]``: ``M[:, :2]`` is
        ``s * R`` with ``R`` a proper rotation (determinant +1; a mirrored configuration is
        fitted by the best rotation, never by a reflection).

    Raises:
        ValueError: Shapes differ, non-finite points, or all ``src`` points coincide.
    """
    s, d = _points(src, "src"), _points(dst, "dst")
    if s.shape != d.shape:
        raise ValueError(f"src {s.shape} and dst {d.shape} must have the same shape")
    mu_s, mu_d = s.mean(0), d.mean(0)
    sc, dc = s - mu_s, d - mu_d
    var_s = (sc ** 2).sum() / len(s)
    if var_s <= 1e-12:
        raise ValueError(f"the src points coincide ({s.tolist()}): no similarity transform fits them")
    cov = dc.T @ sc / len(s)
    u, sig, vt = np.linalg.svd(cov)
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[-1] = -1.0  # the best proper rotation, not a reflection
    rot = u @ np.diag(sign) @ vt
    scale = (sig * sign).sum() / var_s
    m = np.empty((2, 3), dtype=np.float64)
    m[:, :2] = scale * rot
    m[:, 2] = mu_d - scale * rot @ mu_s
    return m


def transform_points(matrix, points) -> np.ndarray:
    """``[K, 2]`` points mapped by a ``[2, 3]`` affine matrix."""
    m = np.asarray(matrix, dtype=np.float64)
    p = _points(points, "points")
    return p @ m[:, :2].T + m[:, 2]


def align_face(image: np.ndarray, landmarks, size: int = 112, template=None) -> np.ndarray:
    """The aligned face crop of ``image`` given its 5 landmarks.

    Args:
        image: ``[H, W, 3]`` (or ``[H, W]``) uint8.
        landmarks: ``[5, 2]`` (x, y) pixel coordinates in ``image`` in the template's order.
        size: Output side; the template is scaled by ``size / 112`` (112: the standard crop).
        template: ``[5, 2]`` reference points for ``size`` (default: the ArcFace template).

    Returns:
        ``[size, size, 3]`` (or ``[size, size]``) uint8: bilinear warp, 0 outside the image.
    """
    img = np.asarray(image)
    if img.dtype != np.uint8 or img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] not in (1, 3)):
        raise ValueError(f"image must be uint8 [H, W, 3] or [H, W], got {img.dtype} {img.shape}")
    lm = _points(landmarks, "landmarks")
    ref = ARCFACE_TEMPLATE_112 * (size / 112.0) if template is None else _points(template, "template")
    if lm.shape != ref.shape:
        raise ValueError(f"landmarks {lm.shape} do not match the template {ref.shape}")
    m = estimate_similarity(lm, ref)
    try:
        import cv2
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("face alignment needs OpenCV: pip install 'partial-fc[eval]' "
                          "(opencv-python-headless)") from e
    out = cv2.warpAffine(np.ascontiguousarray(img), m, (size, size), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    if img.ndim == 3 and out.ndim == 2:
        out = out[..., None]
    return out


def read_landmarks(path) -> dict[str, np.ndarray]:
    """Reads a 5-point landmark file: one face a line, ``NAME x1 y1 x2 y2 x3 y3 x4 y4 x5 y5 [score]``.

    ``NAME`` is the image's path (as the caller keys it, e.g. relative to a folder); a trailing
    detector score, as in the insightface release files, is accepted and ignored. Blank lines and
    lines starting with ``#`` are skipped. Points are in the template's order (left eye, right eye,
    nose, left mouth corner, right mouth corner), in pixels of the original image.

    Returns:
        ``{name: [5, 2] float64}``.

    Raises:
        ValueError: A malformed line or a name given twice; the message names file and line.
    """
    out: dict[str, np.ndarray] = {}
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise ValueError(f"{path}:{lineno}: not UTF-8 text") from None
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) not in (11, 12):
                raise ValueError(f"{path}:{lineno}: expected NAME and 10 coordinates (and an optional "
                                 f"score), got {len(parts)} fields")
            try:
                pts = np.array([float(v) for v in parts[1:11]], dtype=np.float64).reshape(5, 2)
            except ValueError:
                raise ValueError(f"{path}:{lineno}: coordinates must be numbers: {line[:120]!r}") from None
            if not np.isfinite(pts).all():
                raise ValueError(f"{path}:{lineno}: coordinates must be finite: {line[:120]!r}")
            if parts[0] in out:
                raise ValueError(f"{path}:{lineno}: {parts[0]} has landmarks twice")
            out[parts[0]] = pts
    return out

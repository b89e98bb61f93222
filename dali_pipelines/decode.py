"""CPU JPEG decoding for the PyTorch fallback loader.

``simplejpeg`` (libjpeg-turbo, decodes straight into a numpy array) is used when
installed; otherwise PIL. Both use libjpeg-turbo's accurate integer IDCT and
fancy upsampling, the same choices as DALI's CPU decoder, so their outputs
agree with DALI's within rounding.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Literal

import numpy as np
from PIL import Image

Backend = Literal["auto", "simplejpeg", "pil"]


def _pil_decode(buf: np.ndarray | bytes) -> np.ndarray:
    with Image.open(io.BytesIO(bytes(buf) if not isinstance(buf, bytes) else buf)) as im:
        if im.mode != "RGB":
            im = im.convert("RGB")
        return np.asarray(im)


def _simplejpeg_decode(buf: np.ndarray | bytes) -> np.ndarray:
    import simplejpeg

    try:
        return simplejpeg.decode_jpeg(buf, colorspace="RGB")
    except ValueError:
        # Not a JPEG simplejpeg understands (e.g. PNG in a record): PIL decides.
        return _pil_decode(buf)


def get_decoder(backend: Backend = "auto") -> Callable[[np.ndarray | bytes], np.ndarray]:
    """Returns a function ``encoded bytes -> [H, W, 3] uint8 RGB``.

    Args:
        backend: ``"simplejpeg"``, ``"pil"`` or ``"auto"`` (simplejpeg if importable).

    Raises:
        ValueError: Unknown backend, or ``"simplejpeg"`` requested but not installed.
    """
    if backend == "pil":
        return _pil_decode
    if backend in ("auto", "simplejpeg"):
        try:
            import simplejpeg  # noqa: F401
        except ImportError:
            if backend == "simplejpeg":
                raise ValueError("backend='simplejpeg' needs `pip install simplejpeg==1.9.0`") from None
            return _pil_decode
        return _simplejpeg_decode
    raise ValueError(f"unknown decoder backend {backend!r}; use 'auto', 'simplejpeg' or 'pil'")


def fit_size(img: np.ndarray, size: int) -> np.ndarray:
    """Center-crops / zero-pads ``[H, W, 3]`` to ``[size, size, 3]``.

    Matches what the DALI pipeline's ``crop_mirror_normalize`` does to records
    that are not ``size x size`` (``pack`` always writes the right size).
    """
    h, w = img.shape[:2]
    if h == size and w == size:
        return img
    out = np.zeros((size, size, 3), dtype=img.dtype)
    y0, x0 = (h - size) // 2, (w - size) // 2
    sy, sx = max(y0, 0), max(x0, 0)
    dy, dx = max(-y0, 0), max(-x0, 0)
    ch, cw = min(size - dy, h - sy), min(size - dx, w - sx)
    out[dy : dy + ch, dx : dx + cw] = img[sy : sy + ch, sx : sx + cw]
    return out

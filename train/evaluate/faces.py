"""Face crops from image files, decoded and aligned in worker processes, a batch at a time.

One *face* is an image file plus either 5 landmarks (aligned to the ArcFace template by
:func:`dali_pipelines.align.align_face`), a face box (cropped with a margin and resized), or
neither (the image is taken as an aligned crop and centre-cropped / padded to the size).

:func:`iter_face_batches` yields ``uint8 [B, 3, S, S]`` tensors in input order; decoding and
warping run in a ``multiprocessing`` pool (``workers`` processes; 0 = in this process), so the
model in the main process is not starved by JPEG decoding.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

__all__ = ["BOX_MARGIN", "FaceSpec", "check_images_exist", "crop_box", "iter_face_batches", "read_face"]

#: Margin added around a face box on every side, as a fraction of the box's larger side, before
#: the square crop is resized (see :func:`crop_box`).
BOX_MARGIN = 0.2


@dataclass(frozen=True)
class FaceSpec:
    """Where one face is: ``path`` and at most one of ``landmarks [5, 2]`` / ``box (x, y, w, h)``."""

    path: str
    landmarks: Optional[np.ndarray] = None
    box: Optional[tuple[float, float, float, float]] = None


def crop_box(image: np.ndarray, box, size: int = 112, margin: float = BOX_MARGIN) -> np.ndarray:
    """The square crop around a face box, resized to ``size`` (bilinear).

    The crop is centred on the box, its side is ``max(w, h) * (1 + 2 * margin)``; what falls
    outside the image is black. Without landmarks this is the best a box gives: the face is
    centred and scaled, not rotated.
    """
    x, y, w, h = (float(v) for v in box)
    if not (w > 0 and h > 0) or not np.isfinite([x, y, w, h]).all():
        raise ValueError(f"face box {box} must have finite coordinates and a positive width and height")
    side = max(w, h) * (1.0 + 2.0 * margin)
    cx, cy = x + w / 2.0, y + h / 2.0
    scale = size / side
    # Maps crop pixel centres onto image pixel centres: u = scale * (x - (cx - side / 2)) - 0.5 + 0.5.
    m = np.array([[scale, 0.0, -scale * (cx - side / 2.0) - 0.5 + 0.5 * scale],
                  [0.0, scale, -scale * (cy - side / 2.0) - 0.5 + 0.5 * scale]])
    import cv2

    return cv2.warpAffine(np.ascontiguousarray(image), m, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def read_face(root: Path, spec: FaceSpec, size: int = 112, margin: float = BOX_MARGIN) -> np.ndarray:
    """``[size, size, 3]`` uint8 RGB crop of one face (see the module docstring)."""
    from dali_pipelines.align import align_face
    from dali_pipelines.decode import fit_size, get_decoder

    f = Path(root) / spec.path
    try:
        data = f.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"image {f} does not exist") from None
    try:
        img = get_decoder("auto")(data)
    except Exception as e:  # noqa: BLE001 - decoders raise assorted types
        raise ValueError(f"cannot decode image {f}: {e}") from e
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if spec.landmarks is not None:
        return align_face(img, spec.landmarks, size)
    if spec.box is not None:
        return crop_box(img, spec.box, size, margin)
    return fit_size(img, size)


def check_images_exist(root: Path, paths: Sequence[str], what: str) -> None:
    """Raises ``FileNotFoundError`` naming the first missing image (and how many are missing)."""
    root = Path(root)
    missing = [p for p in dict.fromkeys(paths) if not (root / p).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FileNotFoundError(f"{what} references image {root / missing[0]}, which does not exist{more}")


_ROOT: Optional[Path] = None
_SIZE = 112
_MARGIN = BOX_MARGIN


def _init(root: str, size: int, margin: float) -> None:
    # Workers import only numpy, PIL/simplejpeg and OpenCV (no torch: seconds saved per worker).
    global _ROOT, _SIZE, _MARGIN
    _ROOT, _SIZE, _MARGIN = Path(root), size, margin
    try:
        import cv2

        cv2.setNumThreads(1)  # one decoding process = one core
    except ImportError:  # pragma: no cover
        pass


def _load_chunk(specs: list[FaceSpec]) -> np.ndarray:
    return np.stack([read_face(_ROOT, s, _SIZE, _MARGIN) for s in specs])


def iter_face_batches(
    root: str | Path, specs: Sequence[FaceSpec], *, batch_size: int = 256, size: int = 112,
    margin: float = BOX_MARGIN, workers: int = 2, progress: bool = False, desc: str = "faces",
) -> Iterator["torch.Tensor"]:
    """Yields ``uint8 [B, 3, size, size]`` batches of the faces in ``specs``, in order.

    Args:
        root: Folder the specs' paths are relative to.
        specs: The faces.
        batch_size: Faces per yielded batch (the last may be smaller).
        size: Output side.
        margin: Box margin (:data:`BOX_MARGIN`).
        workers: Decoding processes (0: decode here).
        progress: Show a tqdm progress bar on stderr.
        desc: Its label.
    """
    import torch

    chunks = [list(specs[i : i + batch_size]) for i in range(0, len(specs), batch_size)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(specs), desc=desc, unit="img", mininterval=2.0)
    try:
        if workers <= 0:
            _init(str(root), size, margin)
            for chunk in chunks:
                arr = _load_chunk(chunk)
                if bar is not None:
                    bar.update(len(arr))
                yield torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
            return
        # At most 2 batches per worker in flight: decoding never runs ahead of the model by more,
        # so memory stays bounded whatever the image count (imap would queue every batch).
        pool = mp.get_context("spawn").Pool(workers, initializer=_init, initargs=(str(root), size, margin))
        try:
            todo = iter(chunks)
            pending = deque(pool.apply_async(_load_chunk, (c,)) for c in itertools.islice(todo, 2 * workers))
            while pending:
                arr = pending.popleft().get()
                nxt = next(todo, None)
                if nxt is not None:
                    pending.append(pool.apply_async(_load_chunk, (nxt,)))
                if bar is not None:
                    bar.update(len(arr))
                yield torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
        finally:
            pool.terminate()
            pool.join()
    finally:
        if bar is not None:
            bar.close()

"""Fixtures: tiny RecordIO face datasets generated per test."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dali_pipelines import InsightFaceWriter


def make_jpeg(seed: int, size: int = 112, quality: int = 90) -> bytes:
    """A smooth random RGB image as JPEG (smooth keeps decoder differences tiny)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((size, size), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_insightface(path: Path, ids: int = 8, per_id: int = 4,
                      corrupt: set[tuple[int, int]] | None = None) -> Path:
    """Writes ``ids x per_id`` images in insightface layout; ``corrupt`` (id, k) get garbage."""
    corrupt = corrupt or set()
    with InsightFaceWriter(path) as w:
        for c in range(ids):
            for k in range(per_id):
                w.add(c, b"definitely not a jpeg" * 4 if (c, k) in corrupt else make_jpeg(c * 100 + k))
    return path


@pytest.fixture
def tiny_rec(tmp_path: Path) -> Path:
    """8 identities x 4 images, insightface layout."""
    return write_insightface(tmp_path / "tiny.rec")


@pytest.fixture
def jpeg() -> Callable[[int], bytes]:
    return make_jpeg

"""``pack``: image folder tree (one sub-folder per identity) -> insightface ``.rec``/``.idx``.

Identities are the sub-folders of the root in sorted order; their labels are
0, 1, 2, ... over the identities that contribute at least one image. Images
that are already ``size x size`` JPEGs are stored byte for byte; anything else
that PIL can open is converted to RGB, resized to ``size x size`` (bicubic)
and re-encoded as JPEG. Unreadable files are skipped and reported.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .dataset import InsightFaceWriter

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}


@dataclass
class PackSummary:
    """Outcome of ``pack_folder``.

    Attributes:
        rec_path: Written ``.rec``.
        identities: Identities written (classes).
        images: Images written.
        bytes: Size of the ``.rec`` in bytes.
        resized: Images that had to be resized / re-encoded.
        skipped: ``(path, reason)`` of every file not packed.
        empty_identities: Sub-folders without a usable image (no label given).
        seconds: Wall time.
    """

    rec_path: str
    identities: int = 0
    images: int = 0
    bytes: int = 0
    resized: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    empty_identities: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def format(self) -> str:
        """Human-readable summary."""
        lines = [
            f"packed {self.images} images of {self.identities} identities into {self.rec_path} "
            f"({self.bytes / 2**20:.1f} MiB) in {self.seconds:.1f}s; {self.resized} resized/re-encoded",
        ]
        if self.skipped:
            reasons = Counter(r.split(":")[0] for _, r in self.skipped)
            lines.append(f"skipped {len(self.skipped)} files: " +
                         ", ".join(f"{n} x {r}" for r, n in reasons.most_common()))
            lines += [f"  {p}: {r}" for p, r in self.skipped[:20]]
            if len(self.skipped) > 20:
                lines.append(f"  ... {len(self.skipped) - 20} more")
        if self.empty_identities:
            lines.append(f"{len(self.empty_identities)} identity folders had no usable image: "
                         + ", ".join(self.empty_identities[:10]))
        return "\n".join(lines)


def _prepare(args: tuple[str, int, int]) -> tuple[str, bytes | None, bool, str]:
    """Worker: file -> (path, jpeg bytes or None, was_converted, skip reason)."""
    path, size, quality = args
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return path, None, False, f"unreadable: {e}"
    if not data:
        return path, None, False, "empty file"
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            im.load()
            if fmt == "JPEG" and im.size == (size, size) and im.mode == "RGB":
                return path, data, False, ""
            rgb = im.convert("RGB")
            if rgb.size != (size, size):
                rgb = rgb.resize((size, size), Image.BICUBIC)
            buf = io.BytesIO()
            rgb.save(buf, format="JPEG", quality=quality)
            return path, buf.getvalue(), True, ""
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        return path, None, False, f"not a decodable image: {type(e).__name__}: {e}"


def _list_tree(root: Path) -> list[tuple[str, list[Path], list[tuple[str, str]]]]:
    """``(identity name, image files, skipped)`` per identity folder, sorted."""
    out = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        files, skipped = [], []
        for f in sorted(d.rglob("*")):
            if not f.is_file():
                continue
            if f.suffix.lower() in IMAGE_EXTENSIONS:
                files.append(f)
            else:
                skipped.append((str(f), f"unsupported extension: {f.suffix or '(none)'}"))
        out.append((d.name, files, skipped))
    return out


def pack_folder(root: str | os.PathLike[str], rec_path: str | os.PathLike[str], *, size: int = 112,
                quality: int = 95, workers: int | None = None, progress: bool = True) -> PackSummary:
    """Packs ``root/<identity>/<images>`` into an insightface-layout ``.rec``/``.idx``.

    Args:
        root: Folder with one sub-folder per identity.
        rec_path: Output ``.rec`` (the ``.idx`` is written next to it).
        size: Images are resized to ``size x size`` when needed.
        quality: JPEG quality for re-encoded images.
        workers: Decode/resize processes (default: CPU count).
        progress: Show a tqdm progress bar.

    Returns:
        A ``PackSummary``.

    Raises:
        ValueError: ``root`` is not a folder or has no identity sub-folders.
    """
    t0 = time.perf_counter()
    root_p = Path(root)
    if not root_p.is_dir():
        raise ValueError(f"pack: {root} is not a directory; pass a folder of identity sub-folders")
    tree = _list_tree(root_p)
    if not tree:
        raise ValueError(f"pack: {root} has no sub-folders; expected one sub-folder per identity")
    summary = PackSummary(rec_path=str(rec_path))
    jobs: list[tuple[str, int, int]] = []
    owner: list[int] = []
    for k, (_, files, skipped) in enumerate(tree):
        summary.skipped += skipped
        jobs += [(str(f), size, quality) for f in files]
        owner += [k] * len(files)
    workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc="pack", unit="img")
    results: Iterable[tuple[str, bytes | None, bool, str]]
    pool = mp.get_context("fork").Pool(workers) if workers > 1 and len(jobs) > 1 else None
    try:
        results = pool.imap(_prepare, jobs, chunksize=16) if pool else map(_prepare, jobs)
        label_of: dict[int, int] = {}
        with InsightFaceWriter(rec_path) as w:
            for k, (path, data, converted, reason) in zip(owner, results):
                if bar is not None:
                    bar.update(1)
                if data is None:
                    summary.skipped.append((path, reason))
                    continue
                if k not in label_of:
                    label_of[k] = len(label_of)
                w.add(label_of[k], data)
                summary.images += 1
                summary.resized += int(converted)
            summary.identities = w.num_classes
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        if bar is not None:
            bar.close()
    summary.empty_identities = [tree[k][0] for k in range(len(tree)) if k not in label_of]
    summary.bytes = os.path.getsize(rec_path)
    summary.seconds = time.perf_counter() - t0
    return summary

"""``pack``: image folder tree (one sub-folder per identity) -> RecordIO, resumable and sharded.

Identities are the sub-folders of the root in sorted order. Labels are fixed
before any image is read: 0, 1, 2, ... over the identity folders that hold at
least one non-empty file with an image extension (so shards can be written in
parallel and a resumed pack gives the same labels). Images that are already
``size x size`` RGB JPEGs are stored byte for byte (their header is parsed,
the pixels are not decoded); anything else PIL can open is decoded, converted
to RGB, resized to ``size x size`` (bicubic) and re-encoded as JPEG (a
per-image ``transform`` hook sits between decode and re-encode). Unreadable
files are skipped and reported; an identity whose files all fail keeps its
label with no images.

Outputs:

* one file (default): ``OUT.rec``/``OUT.idx``, insightface layout when it fits
  (fewer than 2^24 records) else plain; ``--layout`` forces one (insightface
  above 2^24 is refused before any work starts);
* ``shards=N``: ``OUT-00000-of-0000N.rec/.idx`` in plain layout (labels in
  every record, one global label space, identities never split across shards)
  plus the manifest ``OUT.json``; one writer process per shard.

Nothing half-written ever looks complete: a shard is written under
``*.partial`` names, verified (every record header re-read), then renamed, and
only then recorded as done in ``OUT.pack/``; the manifest is written last.
Re-running the same command resumes: finished shards are verified and kept,
partial ones are discarded and redone. The pack also stores the dataset's
binary index cache, so the first open of the result does not re-read the data.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import os
import queue
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from . import index_cache
from .dataset import (
    INSIGHTFACE_MAX_RECORDS,
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    InsightFaceWriter,
    build_index,
    read_manifest,
)
from .index_cache import Source
from .recordio import RecordIOError, RecordWriter, pack_image_record

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
PackLayout = Literal["auto", "insightface", "plain"]
#: Decoded image -> image, applied before re-encoding (e.g. 5-point alignment); None: none.
Transform = Callable[[Image.Image, str], Image.Image]
_STATE_VERSION = 1


class PackError(ValueError):
    """``pack`` cannot continue; the message names the file (and what to do)."""


@dataclass
class PackSummary:
    """Outcome of ``pack_folder``.

    Attributes:
        rec_path: Written ``.rec`` (or the manifest ``.json`` of a sharded pack).
        identities: Identities written (classes).
        images: Images written.
        bytes: Size of the ``.rec`` files in bytes.
        resized: Images that had to be resized / re-encoded.
        skipped: ``(path, reason)`` of every file not packed.
        empty_identities: Sub-folders without a usable image.
        seconds: Wall time.
        shards: Shards written (1 for a single file).
        resumed_shards: Finished shards found, verified and kept from an earlier run.
        layout: ``"insightface"`` or ``"plain"``.
    """

    rec_path: str
    identities: int = 0
    images: int = 0
    bytes: int = 0
    resized: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    empty_identities: list[str] = field(default_factory=list)
    seconds: float = 0.0
    shards: int = 1
    resumed_shards: int = 0
    layout: str = "insightface"

    def format(self) -> str:
        """Human-readable summary."""
        where = self.rec_path if self.shards == 1 else f"{self.shards} shards ({self.rec_path})"
        lines = [
            f"packed {self.images} images of {self.identities} identities into {where} "
            f"({self.bytes / 2**20:.1f} MiB, {self.layout} layout) in {self.seconds:.1f}s; "
            f"{self.resized} resized/re-encoded",
        ]
        if self.resumed_shards:
            lines.append(f"resumed: {self.resumed_shards} finished shard(s) verified and kept")
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


# ----------------------------------------------------------------------------- one image


def _jpeg_is_complete(data: bytes) -> bool:
    # A JPEG ends with the EOI marker (possibly followed by padding): cheap truncation check.
    return data.rstrip(b"\x00")[-2:] == b"\xff\xd9"


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def jpeg_geometry(data: bytes) -> tuple[int, int, int] | None:
    """``(width, height, components)`` from a JPEG's SOF marker, or None if not parseable.

    Walks the marker segments only (tens of microseconds, ~10x cheaper than
    ``PIL.Image.open``): the byte-for-byte copy path needs nothing else.
    """
    if data[:2] != b"\xff\xd8":
        return None
    pos, n = 2, len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        seg = (data[pos + 2] << 8) | data[pos + 3]
        if marker in _SOF:
            if pos + 10 > n or seg < 8:
                return None
            h = (data[pos + 5] << 8) | data[pos + 6]
            w = (data[pos + 7] << 8) | data[pos + 8]
            return w, h, data[pos + 9]
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any SOF
            return None
        pos += 2 + seg
    return None


def prepare_image(path: str, data: bytes, size: int, quality: int,
                  transform: Transform | None = None) -> tuple[bytes | None, bool, str]:
    """File bytes -> ``(jpeg bytes or None, was_converted, skip reason)``.

    The one place an image is turned into what gets stored: a ``size x size``
    RGB JPEG without ``transform`` is copied byte for byte (header parsed, no
    pixel decode); everything else is decoded -> ``transform`` -> resized ->
    re-encoded.

    Raises:
        PackError: A decompression bomb (PIL's pixel limit) or another failure
            that is not simply an undecodable file; the message names ``path``.
    """
    if not data:
        return None, False, "empty file"
    if transform is None and jpeg_geometry(data) == (size, size, 3) and _jpeg_is_complete(data):
        return data, False, ""  # already what we store: copied byte for byte, not decoded
    try:
        with Image.open(io.BytesIO(data)) as im:
            if (transform is None and im.format == "JPEG" and im.size == (size, size)
                    and im.mode == "RGB" and _jpeg_is_complete(data)):
                return data, False, ""
            im.load()
            rgb = im.convert("RGB")
            if transform is not None:
                rgb = transform(rgb, path)
            if rgb.size != (size, size):
                rgb = rgb.resize((size, size), Image.BICUBIC)
            buf = io.BytesIO()
            rgb.save(buf, format="JPEG", quality=quality)
            return buf.getvalue(), True, ""
    except Image.DecompressionBombError as e:
        raise PackError(f"{path}: refused as a decompression bomb ({e}); remove or shrink the file "
                        "and run the same command again (finished shards are kept)") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as e:
        return None, False, f"not a decodable image: {type(e).__name__}: {e}"
    except PackError:
        raise
    except Exception as e:  # noqa: BLE001 - anything else: name the file, stop the pack
        raise PackError(f"{path}: {type(e).__name__}: {e}") from e


class _Align:
    """The ``transform`` of ``pack --landmarks``: the 5-point alignment of one image (picklable)."""

    def __init__(self, landmarks: tuple[float, ...], size: int) -> None:
        self.landmarks = landmarks
        self.size = size

    def __call__(self, rgb: Image.Image, path: str) -> Image.Image:
        from .align import align_face

        pts = np.asarray(self.landmarks, dtype=np.float64).reshape(5, 2)
        return Image.fromarray(align_face(np.asarray(rgb), pts, size=self.size))


def _prepare_file(args: tuple) -> tuple[str, bytes | None, bool, str]:
    """``(path, size, quality[, landmarks])`` -> ``(path, jpeg or None, converted, skip reason)``."""
    path, size, quality = args[:3]
    landmarks = args[3] if len(args) > 3 else None
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return path, None, False, f"unreadable: {e}"
    transform = _Align(landmarks, size) if landmarks is not None else None
    out, converted, reason = prepare_image(path, data, size, quality, transform)
    return path, out, converted, reason


def _landmarks_for(ids: list["_Identity"], root: Path, path: str | os.PathLike[str]
                   ) -> tuple[dict[str, tuple[float, ...]], str]:
    """``({image path: 10 floats}, sha256 of the file)`` for every image of ``ids``.

    Keys of the landmark file are paths relative to ``root`` with ``/`` separators. Every image
    must have landmarks: a missing one is an error before any work, never a silently unaligned
    face.
    """
    from .align import read_landmarks

    table = read_landmarks(path)
    out: dict[str, tuple[float, ...]] = {}
    missing = []
    for ident in ids:
        for f in ident.files:
            key = Path(os.path.relpath(f, root)).as_posix()
            pts = table.get(key)
            if pts is None:
                missing.append(key)
            else:
                out[f] = tuple(float(v) for v in pts.reshape(-1))
    if missing:
        raise ValueError(f"pack --landmarks: {len(missing)} image(s) under {root} have no line in {path}, "
                         f"e.g. {', '.join(missing[:5])}; add them (NAME relative to ROOT, then x1 y1 .. x5 y5) "
                         "or remove the images")
    with open(path, "rb") as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()
    return out, digest


# ----------------------------------------------------------------------------- plan


@dataclass
class _Identity:
    name: str
    label: int
    files: list[str]


def _list_tree(root: Path) -> tuple[list[_Identity], list[str], list[tuple[str, str]]]:
    """``(labelled identities, folders without candidates, skipped files)``; labels fixed here."""
    ids: list[_Identity] = []
    empty: list[str] = []
    skipped: list[tuple[str, str]] = []
    dirs = sorted(e.name for e in os.scandir(root) if e.is_dir())
    for name in dirs:
        files = []
        for dirpath, subdirs, names in os.walk(root / name):
            subdirs.sort()
            for n in sorted(names):
                f = os.path.join(dirpath, n)
                ext = os.path.splitext(n)[1].lower()
                if ext not in IMAGE_EXTENSIONS:
                    skipped.append((f, f"unsupported extension: {ext or '(none)'}"))
                    continue
                try:
                    if os.path.getsize(f) == 0:
                        skipped.append((f, "empty file"))
                        continue
                except OSError as e:
                    skipped.append((f, f"unreadable: {e}"))
                    continue
                files.append(f)
        files.sort()
        if files:
            ids.append(_Identity(name, len(ids), files))
        else:
            empty.append(name)
    return ids, empty, skipped


def _split(ids: list[_Identity], shards: int) -> list[list[_Identity]]:
    """Contiguous identity groups with about equal image counts; identities are never split."""
    counts = np.cumsum([len(i.files) for i in ids])
    total = int(counts[-1])
    cuts = [0]
    for k in range(1, shards):
        c = int(np.searchsorted(counts, total * k / shards, side="left")) + 1
        c = min(max(c, cuts[-1] + 1), len(ids) - (shards - k))
        cuts.append(c)
    cuts.append(len(ids))
    return [ids[a:b] for a, b in zip(cuts[:-1], cuts[1:])]


def _shard_names(out: Path, shards: int) -> list[tuple[Path, Path]]:
    if shards == 1:
        return [(out.with_suffix(".rec"), out.with_suffix(".idx"))]
    stem = out.with_suffix("")
    return [(Path(f"{stem}-{i:05d}-of-{shards:05d}.rec"), Path(f"{stem}-{i:05d}-of-{shards:05d}.idx"))
            for i in range(shards)]


def _plan_digest(ids: list[_Identity], **options: Any) -> str:
    h = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    for i in ids:
        h.update(i.name.encode("utf-8", "surrogateescape") + b"\0" + str(i.label).encode() + b"\0")
        for f in i.files:
            h.update(f.encode("utf-8", "surrogateescape") + b"\0")
    return h.hexdigest()


# ----------------------------------------------------------------------------- one shard


@dataclass
class _ShardTask:
    index: int
    identities: list[_Identity]
    rec: str
    idx: str
    state: str  # the shard's record in OUT.pack/ (written once it is final)
    layout: str
    size: int
    quality: int
    label_base: int
    num_labels: int
    digest: str = ""  # of this shard's identities, labels, files and the options
    landmarks: dict[str, tuple[float, ...]] | None = None  # pack --landmarks: image path -> 10 floats


def _partial(p: str) -> str:
    return p + ".partial"


def _remove(*paths: str) -> None:
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def _write_shard(task: _ShardTask, images: Iterable[tuple[int, str, bytes | None, bool, str]],
                 tick: Callable[[int], None]) -> dict[str, Any]:
    """Writes one shard under ``*.partial`` names, verifies it, renames it into place.

    ``images`` yields ``(label, path, jpeg or None, converted, reason)`` in order.
    Returns the shard's record (counts, label range, skips, sizes).
    """
    rec_tmp, idx_tmp = _partial(task.rec), _partial(task.idx)
    # Old final files of a shard being redone are not trustworthy: remove them first, so
    # a crash between the two renames below can never pair a new .idx with an old .rec.
    _remove(task.state, task.idx, task.rec, rec_tmp, idx_tmp)
    stats: dict[str, Any] = {"images": 0, "resized": 0, "skipped": [], "empty": []}
    labels_seen: set[int] = set()
    writer: InsightFaceWriter | RecordWriter
    writer = InsightFaceWriter(rec_tmp, idx_tmp) if task.layout == "insightface" else RecordWriter(rec_tmp, idx_tmp)
    ok = False
    try:
        key = 0
        pending = 0
        for label, path, data, converted, reason in images:
            if isinstance(writer, InsightFaceWriter):
                while writer.num_classes < label:  # identities whose files all failed
                    writer.add_empty_class()
            pending += 1
            if pending >= 256:
                tick(pending)
                pending = 0
            if data is None:
                stats["skipped"].append((path, reason))
                continue
            if isinstance(writer, InsightFaceWriter):
                writer.add(label, data)
            else:
                writer.write(key, pack_image_record(float(label), data, id=key))
                key += 1
            labels_seen.add(label)
            stats["images"] += 1
            stats["resized"] += int(converted)
        tick(pending)
        if isinstance(writer, InsightFaceWriter):
            while writer.num_classes < task.label_base + task.num_labels:
                writer.add_empty_class()
        writer.close()
        ok = True
    finally:
        if not ok:
            writer.abort()
            _remove(rec_tmp, idx_tmp)
    try:
        # Verify before the shard becomes final: every header re-read, counts must match.
        if stats["images"]:
            meta, arrays = build_index([Source(rec_tmp, idx_tmp)], "auto")
        else:  # every file of the shard was skipped: nothing to read back
            meta = {"num_images": 0, "layout": task.layout}
            arrays = {k: np.zeros(0, np.int64) for k in ("keys", "offsets", "data_start", "data_len", "labels")}
        if meta["num_images"] != stats["images"]:
            raise PackError(f"{task.rec}: verification read {meta['num_images']} image records, "
                            f"{stats['images']} were written")
        for f in (rec_tmp, idx_tmp):  # on disk before the names say "complete"
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        # The .idx first: a .rec without its .idx would open by scanning, an .idx alone never.
        os.replace(idx_tmp, task.idx)
        os.replace(rec_tmp, task.rec)
    except BaseException:
        _remove(rec_tmp, idx_tmp, task.rec, task.idx)
        raise
    labels = arrays["labels"]
    stats["empty"] = [i.name for i in task.identities if i.label not in labels_seen]
    st_rec, st_idx = os.stat(task.rec), os.stat(task.idx)
    rec = {"version": _STATE_VERSION, "index": task.index, "digest": task.digest,
           "rec": os.path.basename(task.rec),
           "idx": os.path.basename(task.idx), "images": stats["images"],
           "classes": task.num_labels, "label_range": [task.label_base, task.label_base + task.num_labels - 1],
           "present_label_range": [int(labels.min()), int(labels.max())] if len(labels) else None,
           "rec_bytes": st_rec.st_size, "idx_bytes": st_idx.st_size, "resized": stats["resized"],
           "skipped": stats["skipped"], "empty": stats["empty"], "layout": meta["layout"]}
    arrays_dir = task.state + ".arrays"
    shutil.rmtree(arrays_dir, ignore_errors=True)
    os.makedirs(arrays_dir)
    for k in ("keys", "offsets", "data_start", "data_len", "labels"):
        np.save(os.path.join(arrays_dir, f"{k}.npy"), arrays[k])
    _atomic_json(task.state, rec)
    return rec


def _atomic_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _shard_images(task: _ShardTask) -> Iterator[tuple[int, str, bytes | None, bool, str]]:
    for ident in task.identities:
        for f in ident.files:
            lm = task.landmarks[f] if task.landmarks is not None else None
            path, data, converted, reason = _prepare_file((f, task.size, task.quality, lm))
            yield ident.label, path, data, converted, reason


_PROGRESS: Any = None  # a multiprocessing queue, inherited by forked shard workers


def _shard_worker(task: _ShardTask) -> dict[str, Any]:
    def tick(n: int) -> None:
        if n and _PROGRESS is not None:
            _PROGRESS.put(n)

    return _write_shard(task, _shard_images(task), tick)


def _kept_shard(task: _ShardTask) -> dict[str, Any] | None:
    """The record of a finished shard from an earlier run if it verifies, else None."""
    try:
        with open(task.state) as f:
            rec = json.load(f)
        if rec.get("digest") != task.digest:
            return None  # the shard's input changed (a file removed, a boundary moved): redo it
        if (os.path.getsize(task.rec), os.path.getsize(task.idx)) != (rec["rec_bytes"], rec["idx_bytes"]):
            return None
        if rec["images"] == 0:
            return rec
        meta, _ = build_index([Source(task.rec, task.idx)], "auto")
    except (OSError, ValueError, KeyError):
        return None
    if meta["num_images"] != rec["images"]:
        return None
    return rec


# ----------------------------------------------------------------------------- pack


def pack_folder(root: str | os.PathLike[str], rec_path: str | os.PathLike[str], *, size: int = 112,
                quality: int = 95, workers: int | None = None, progress: bool = True,
                layout: PackLayout = "auto", shards: int | None = None,
                landmarks: str | os.PathLike[str] | None = None) -> PackSummary:
    """Packs ``root/<identity>/<images>`` into RecordIO (one file or ``shards`` shards).

    Args:
        root: Folder with one sub-folder per identity.
        rec_path: Output ``.rec`` (the ``.idx`` is written next to it); with
            ``shards``, the output stem (``OUT-00000-of-0000N.rec``, ``OUT.json``).
        size: Images are resized to ``size x size`` when needed.
        quality: JPEG quality for re-encoded images.
        workers: Processes (default: CPU count): decoders for one file, shard
            writers with ``shards``.
        progress: Show a tqdm progress bar (images/s and ETA).
        layout: ``"auto"``: insightface for one file below 2^24 records, else
            plain. ``"insightface"`` is refused up front above 2^24 records or
            with shards.
        shards: Number of shards (plain layout, one writer process per shard).
        landmarks: A 5-point landmark file (``NAME x1 y1 ... x5 y5 [score]``, NAME relative to
            ``root``): every image is aligned to the ArcFace template at ``size`` before it is
            stored (``dali_pipelines.align``). Every image needs a line.

    Returns:
        A ``PackSummary``.

    Raises:
        ValueError: ``root`` is not a folder, has no identity sub-folders, or
            the options do not fit (message says which); ``PackError`` names an
            image that stops the pack (e.g. a decompression bomb).
    """
    t0 = time.perf_counter()
    root_p = Path(root)
    if not root_p.is_dir():
        raise ValueError(f"pack: {root} is not a directory; pass a folder of identity sub-folders")
    if not any(e.is_dir() for e in os.scandir(root_p)):
        raise ValueError(f"pack: {root} has no sub-folders; expected one sub-folder per identity")
    if shards is not None and shards < 1:
        raise ValueError(f"pack: --shards must be >= 1, got {shards}")
    out = Path(rec_path)
    if out.suffix in (".rec", ".json"):
        out = out.with_suffix("")
    ids, empty, skipped = _list_tree(root_p)
    n_files = sum(len(i.files) for i in ids)
    n_shards = shards or 1
    records = n_files + len(ids) + 1  # images + identity records + header
    if layout == "insightface":
        if shards is not None and shards > 1:
            raise ValueError("pack: the insightface layout is a single file; use --layout plain with --shards")
        if records > INSIGHTFACE_MAX_RECORDS:
            raise ValueError(
                f"pack: {n_files} images of {len(ids)} identities need {records} records, more than the "
                f"insightface layout holds (2^24 = {INSIGHTFACE_MAX_RECORDS}: it stores keys as float32); "
                "use --layout plain, or --shards N")
    elif layout == "auto":
        layout = "insightface" if shards is None and records <= INSIGHTFACE_MAX_RECORDS else "plain"
    elif layout != "plain":
        raise ValueError(f"pack: unknown layout {layout!r}; use auto, insightface or plain")
    summary = PackSummary(rec_path=str(out.with_suffix(".rec") if shards is None else out.with_suffix(".json")),
                          shards=n_shards, layout=layout, skipped=list(skipped), empty_identities=list(empty))
    if not ids:
        summary.seconds = time.perf_counter() - t0
        return summary
    if n_shards > len(ids):
        raise ValueError(f"pack: {n_shards} shards but only {len(ids)} identities; identities are never "
                         "split across shards, so use at most that many")
    out.parent.mkdir(parents=True, exist_ok=True)
    groups = _split(ids, n_shards)
    names = _shard_names(out, n_shards)
    state_dir = Path(f"{out}.pack")
    options = dict(size=size, quality=quality, layout=layout, shards=n_shards, version=_STATE_VERSION)
    landmark_table = None
    if landmarks is not None:
        landmark_table, options["landmarks_sha256"] = _landmarks_for(ids, root_p, landmarks)
    # The options must match to resume; the input may change (e.g. a bad file removed): each
    # finished shard is kept only if its own identities, labels and files are unchanged.
    digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()
    plan_file = state_dir / "plan.json"
    if state_dir.is_dir() and plan_file.is_file():
        old = json.loads(plan_file.read_text())
        if old.get("digest") != digest or old.get("root") != str(root_p.resolve()):
            raise ValueError(
                f"pack: {state_dir} holds a pack of a different input folder or options "
                f"(root {old.get('root')}, {old.get('options')}); remove {state_dir} (and the old "
                "outputs) or pick another output")
    state_dir.mkdir(exist_ok=True)
    _atomic_json(str(plan_file), {"digest": digest, "root": str(root_p.resolve()), "options": options})
    tasks = []
    for k, (grp, (rec, idx)) in enumerate(zip(groups, names)):
        tasks.append(_ShardTask(k, grp, str(rec), str(idx), str(state_dir / f"shard-{k:05d}.json"), layout,
                                size, quality, grp[0].label, len(grp), _plan_digest(grp, **options),
                                None if landmark_table is None else
                                {f: landmark_table[f] for i in grp for f in i.files}))
    done: dict[int, dict[str, Any]] = {}
    for t in tasks:
        kept = _kept_shard(t)
        if kept is not None:
            done[t.index] = kept
    summary.resumed_shards = len(done)
    todo = [t for t in tasks if t.index not in done]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_files, desc="pack", unit="img", dynamic_ncols=True, smoothing=0.05,
                   initial=sum(sum(len(i.files) for i in tasks[k].identities) for k in done))
    tick = bar.update if bar is not None else (lambda n: None)
    workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
    try:
        if len(todo) == 1 or workers == 1:
            for t in todo:
                done[t.index] = _pack_one_parallel_decode(t, workers, tick)
        elif todo:
            done.update(_pack_shards_parallel(todo, workers, tick))
    finally:
        if bar is not None:
            bar.close()
    records_ = [done[k] for k in range(n_shards)]
    _finish(out, state_dir, tasks, records_, layout, shards is not None)
    for r in records_:
        summary.images += r["images"]
        summary.resized += r["resized"]
        summary.skipped += [tuple(s) for s in r["skipped"]]
        summary.empty_identities += r["empty"]
        summary.bytes += r["rec_bytes"]
    summary.identities = len(ids)
    summary.seconds = time.perf_counter() - t0
    return summary


def _pack_one_parallel_decode(t: _ShardTask, workers: int, tick: Callable[[int], None]) -> dict[str, Any]:
    """One shard in this process; a pool decodes/converts images ahead of the writer."""
    jobs = [(f, t.size, t.quality, t.landmarks[f] if t.landmarks is not None else None)
            for i in t.identities for f in i.files]
    label_of = [i.label for i in t.identities for _ in i.files]
    pool = mp.get_context("fork").Pool(workers) if workers > 1 and len(jobs) > 1 else None
    try:
        results = pool.imap(_prepare_file, jobs, chunksize=64) if pool else map(_prepare_file, jobs)
        images = ((lab, *r) for lab, r in zip(label_of, results))
        return _write_shard(t, images, tick)
    except BaseException:
        if pool is not None:
            pool.terminate()
        raise
    finally:
        if pool is not None:
            pool.close()
            pool.join()


def _pack_shards_parallel(todo: list[_ShardTask], workers: int, tick: Callable[[int], None]
                          ) -> dict[int, dict[str, Any]]:
    """One writer process per shard (at most ``workers`` at once); progress through a queue.

    When a shard fails, no new shard is started but the running ones finish (and are
    kept for the resume), then the first error is raised. Ctrl-C stops everything at
    once; the killed writers leave only ``*.partial`` files.
    """
    global _PROGRESS
    ctx = mp.get_context("fork")
    _PROGRESS = ctx.Queue()
    n_proc = min(workers, len(todo))
    pool = ctx.Pool(n_proc)
    out: dict[int, dict[str, Any]] = {}
    error: BaseException | None = None
    waiting = list(todo)
    running: dict[int, Any] = {}
    try:
        while waiting or running:
            while waiting and len(running) < n_proc and error is None:
                t = waiting.pop(0)
                running[t.index] = pool.apply_async(_shard_worker, (t,))
            if error is not None and not running:
                break
            try:
                while True:
                    tick(_PROGRESS.get(timeout=0.2))
            except queue.Empty:
                pass
            for k in [k for k, r in running.items() if r.ready()]:
                try:
                    out[k] = running.pop(k).get()
                except Exception as e:  # noqa: BLE001 - re-raised below, once the others finished
                    error = error or e
        while True:
            try:
                tick(_PROGRESS.get_nowait())
            except queue.Empty:
                break
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()
        _PROGRESS = None
    if error is not None:
        raise error
    return out


def _finish(out: Path, state_dir: Path, tasks: list[_ShardTask], records: list[dict[str, Any]],
            layout: str, sharded: bool) -> None:
    """Writes the index cache and (sharded) the manifest, last, atomically."""
    for t in tasks:
        _remove(_partial(t.rec), _partial(t.idx))
    sources = [Source(t.rec, t.idx) for t in tasks]
    name = out.with_suffix(".json" if sharded else ".rec").name  # what opening the result uses
    if sharded:
        manifest = {
            "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "name": name, "layout": layout,
            "num_images": sum(r["images"] for r in records),
            "num_classes": records[-1]["label_range"][1] + 1,
            "shards": [{"rec": r["rec"], "idx": r["idx"], "images": r["images"], "classes": r["classes"],
                        "label_range": r["label_range"], "rec_bytes": r["rec_bytes"]} for r in records],
        }
        _atomic_json(str(out.with_suffix(".json")), manifest)
    _store_cache(sources, state_dir, tasks, records, name)
    for t in tasks:  # the writers' arrays were only needed for the cache (40 bytes per image)
        shutil.rmtree(t.state + ".arrays", ignore_errors=True)


def _store_cache(sources: list[Source], state_dir: Path, tasks: list[_ShardTask],
                 records: list[dict[str, Any]], name: str) -> None:
    """Saves the index cache from the writers' arrays, so opening the result reads no data."""
    try:
        if not all(os.path.isdir(t.state + ".arrays") for t in tasks):
            return  # resumed after the arrays were removed: the first open builds the cache
        parts = [{k: np.load(t.state + ".arrays/" + f"{k}.npy") for k in
                  ("keys", "offsets", "data_start", "data_len", "labels")} for t in tasks]
        if records[0]["layout"] == "insightface" or len(parts) != len(sources):
            return  # identity ranges come from the file itself: the first open builds the cache
        arrays = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        labels = arrays["labels"]
        num_classes = records[-1]["label_range"][1] + 1
        if len(sources) > 1:
            arrays["shard"] = np.repeat(np.arange(len(parts), dtype=np.uint16), [len(p["labels"]) for p in parts])
        arrays["class_counts"] = np.bincount(labels, minlength=num_classes).astype(np.int64)
        meta = {"layout": "plain", "num_images": int(len(labels)), "num_classes": int(num_classes),
                "label_min": int(labels.min()), "label_max": int(labels.max()),
                "shards": [{"rec": s.rec, "images": int(len(p["labels"])), "label_min": int(p["labels"].min()),
                            "label_max": int(p["labels"].max())} for s, p in zip(sources, parts)],
                "fingerprint": index_cache.fingerprint(sources, "auto")}
        # Stored under the key an open of the result computes (default layout "auto").
        path = index_cache.entry_path(sources, "auto", name)
        if not path.exists():
            index_cache.write_entry(path, meta, arrays)
    except (OSError, ValueError):
        pass  # the cache is an optimisation: the first open builds it


# ----------------------------------------------------------------------------- verify


@dataclass
class VerifyReport:
    """Outcome of ``verify_dataset``: counts, label range and the problems found."""

    path: str
    shards: int = 0
    images: int = 0
    classes: int = 0
    label_min: int = -1
    label_max: int = -1
    bytes: int = 0
    problems: list[str] = field(default_factory=list)
    per_shard: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No problem found."""
        return not self.problems

    def format(self) -> str:
        """Human-readable report."""
        lines = [f"{self.path}: {self.shards} file(s), {self.images} images, {self.classes} classes with "
                 f"images, labels {self.label_min}..{self.label_max}, {self.bytes / 2**20:.1f} MiB"]
        lines += [f"  shard {s['shard']}: {s['rec']}: {s['images']} images, labels "
                  f"{s['label_min']}..{s['label_max']}" for s in self.per_shard if len(self.per_shard) > 1]
        lines += [f"problem: {p}" for p in self.problems] or ["ok: every record header re-read, no problem"]
        return "\n".join(lines)


def verify_dataset(path: str | os.PathLike[str]) -> VerifyReport:
    """Re-reads every record header of a ``.rec`` or shard manifest (no decoding) and checks it.

    Checks: framing (magic, lengths) at every indexed offset, labels are
    non-negative integers, records tile the file (no gap or trailing bytes
    after the last record), the manifest's counts, and that no identity is
    split across shards. Never uses the index cache.
    """
    p = str(path)
    rep = VerifyReport(p)
    manifest = None
    try:
        if p.endswith(".json"):
            manifest = read_manifest(p)
            sources = [Source(s["rec"], s["idx"]) for s in manifest["shards"]]
        else:
            idx = Path(p).with_suffix(".idx")
            sources = [Source(p, str(idx) if idx.is_file() else None)]
    except (RecordIOError, OSError) as e:
        rep.problems.append(str(e))
        return rep
    rep.shards = len(sources)
    all_counts: list[np.ndarray] = []
    ranges = []
    for i, s in enumerate(sources):
        tag = f"shard {i} ({s.rec})" if len(sources) > 1 else s.rec
        try:
            meta, arrays = build_index([s], "auto")
        except (RecordIOError, OSError, ValueError) as e:
            rep.problems.append(f"{tag}: {e}" if len(sources) > 1 else str(e))
            continue
        size = os.path.getsize(s.rec)
        rep.bytes += size
        n = meta["num_images"]
        labels = arrays["labels"]
        rep.images += n
        ranges.append((int(labels.min()), int(labels.max()), i))
        rep.per_shard.append({"shard": i, "rec": s.rec, "images": n, "label_min": int(labels.min()),
                              "label_max": int(labels.max())})
        all_counts.append(np.bincount(labels))
        if meta["layout"] == "plain":
            _check_tiling(tag, arrays, size, rep.problems)
        if manifest is not None:
            sh = manifest["shards"][i]
            if int(sh.get("images", n)) != n:
                rep.problems.append(f"{tag}: {n} image records, the manifest says {sh['images']}")
            lr = sh.get("label_range")
            if lr is not None and (labels.min() < lr[0] or labels.max() > lr[1]):
                rep.problems.append(f"{tag}: labels {int(labels.min())}..{int(labels.max())} outside the "
                                    f"manifest's range {lr[0]}..{lr[1]}")
    if all_counts:
        width = max(len(c) for c in all_counts)
        total = np.zeros(width, np.int64)
        for c in all_counts:
            total[: len(c)] += c
        rep.classes = int((total > 0).sum())
        rep.label_min = min(r[0] for r in ranges)
        rep.label_max = max(r[1] for r in ranges)
        if len(all_counts) > 1:
            present = [set(np.flatnonzero(c).tolist()) for c in all_counts]
            for a in range(len(present)):
                for b in range(a + 1, len(present)):
                    both = present[a] & present[b]
                    if both:
                        rep.problems.append(f"identity {min(both)} appears in shards {a} and {b} "
                                            f"({len(both)} identities split)")
    if manifest is not None and "num_images" in manifest and int(manifest["num_images"]) != rep.images:
        rep.problems.append(f"{p}: {rep.images} images in the shards, the manifest says {manifest['num_images']}")
    return rep


def _check_tiling(tag: str, arrays: dict[str, np.ndarray], size: int, problems: list[str]) -> None:
    """Single-part records must follow each other without gaps up to the end of the file."""
    start, length, offs = arrays["data_start"], arrays["data_len"], arrays["offsets"]
    single = start >= 0
    if not single.all() or len(offs) == 0:
        return  # multi-part records: lengths are not known from the headers alone
    order = np.argsort(offs, kind="stable")
    o, st, ln = offs[order], start[order], length[order]
    plen = st + ln - o - 8
    end = o + 8 + plen + ((4 - (plen & 3)) & 3)
    if o[0] != 0:
        problems.append(f"{tag}: {int(o[0])} bytes before the first indexed record (offset 0)")
    gap = np.flatnonzero(end[:-1] != o[1:])
    if gap.size:
        j = int(gap[0])
        problems.append(f"{tag}: record at offset {int(o[j])} ends at {int(end[j])} but the next indexed "
                        f"record starts at {int(o[j + 1])} ({gap.size} such gaps: unindexed or damaged data)")
    if int(end[-1]) != size:
        problems.append(f"{tag}: the last record ends at offset {int(end[-1])} but the file has {size} bytes")


__all__ = ["PackError", "PackSummary", "VerifyReport", "jpeg_geometry", "pack_folder", "prepare_image",
           "verify_dataset"]

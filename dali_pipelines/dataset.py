"""Face datasets stored as RecordIO: layout detection, labels, class counts.

Two layouts are understood (see docs/data.md):

* ``insightface``: record 0 is a header record (``flag > 0``, no image) whose
  label vector ``[a, b]`` says that keys ``1 .. a-1`` are image records and keys
  ``a .. b-1`` are identity records, one per class in class order, each with a
  label vector ``[start, end)`` of the image keys of that identity.
* ``plain``: every record is an image record (e.g. written by im2rec). Records
  may be in any order; the number of classes is ``max(label) + 1`` unless given.

Image labels are read from every image record's header (vectorised over the
memory map) and validated to lie in ``[0, num_classes)``.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Literal

import numpy as np

from .recordio import (
    IR_SIZE,
    MAGIC,
    RecordIOError,
    RecordReader,
    unpack_image_record,
    write_index,
)

Layout = Literal["auto", "insightface", "plain"]
_LEN_MASK = (1 << 29) - 1
_CHUNK = 1 << 20


class FaceRecordDataset:
    """Image records of a face ``.rec`` file with validated integer labels.

    Args:
        rec_path: The ``.rec`` file.
        idx_path: Its ``.idx`` (None: next to ``rec_path`` if present, else scan).
        layout: ``"auto"`` detects an insightface header record at key 0.
        num_classes: For ``plain`` files, the class count to validate against
            (default ``max(label) + 1``). For insightface files it must equal the
            number of identity records if given.

    Attributes:
        layout: ``"insightface"`` or ``"plain"``.
        image_keys: ``[N] int64`` index keys of the image records.
        image_offsets: ``[N] int64`` byte offsets of the image records.
        labels: ``[N] int64`` class of each image record.
        num_classes: Number of classes ``C``.
        class_counts: ``[C] int64`` images per class.
        identity_ranges: ``[C, 2] int64`` ``[start, end)`` image keys per class
            (insightface layout only, else None).

    Raises:
        RecordIOError: Malformed file, index beyond EOF, or a label outside
            ``[0, num_classes)``; the message names file, key and offset.
    """

    def __init__(
        self,
        rec_path: str | os.PathLike[str],
        idx_path: str | os.PathLike[str] | None = None,
        *,
        layout: Layout = "auto",
        num_classes: int | None = None,
    ) -> None:
        self.rec_path = str(rec_path)
        reader = RecordReader(rec_path, idx_path)
        self.idx_path = reader.idx_path
        self._reader: RecordReader | None = reader
        self._pid = os.getpid()
        self.identity_ranges: np.ndarray | None = None
        try:
            self._load(reader, layout, num_classes)
        except Exception:
            reader.close()
            raise
        # Parsed once; the per-sample fast path slices the map with these.
        self._u8: np.ndarray | None = None

    # -------------------------------------------------------------------------- loading

    def _load(self, reader: RecordReader, layout: Layout, num_classes: int | None) -> None:
        keys, offsets = reader.keys, reader.offsets
        if len(keys) == 0:
            raise RecordIOError(f"{self.rec_path}: file contains no records")
        header = None
        if layout in ("auto", "insightface") and reader.has_key(0):
            rec0 = reader.read_image(0)
            h = rec0.header
            if h.flag > 0 and rec0.label is not None and rec0.label.size >= 2 and not rec0.payload:
                header = rec0
        if layout == "insightface" and header is None:
            raise RecordIOError(
                f"{self.rec_path}: layout='insightface' but record 0 is not a header record "
                "(flag > 0, label vector [first_identity_key, end_key], no image); "
                "use layout='plain' or 'auto'"
            )
        if header is not None:
            self.layout = "insightface"
            assert header.label is not None
            a, b = int(header.label[0]), int(header.label[1])
            if not (1 <= a <= b):
                raise RecordIOError(
                    f"{self.rec_path}: header record 0 has invalid ranges [{a}, {b}] at offset "
                    f"{reader.offset_of(0)}; expected 1 <= first_identity_key <= end_key"
                )
            img_keys = np.arange(1, a, dtype=np.int64)
            id_keys = np.arange(a, b, dtype=np.int64)
            all_keys = np.concatenate([img_keys, id_keys])
            found = reader.positions(all_keys)
            if (found < 0).any():
                missing = all_keys[found < 0]
                raise RecordIOError(
                    f"{self.idx_path or self.rec_path}: header says keys 1..{b - 1} exist but "
                    f"{len(missing)} are missing (first: {int(missing[0])})"
                )
            ranges = np.zeros((len(id_keys), 2), dtype=np.int64)
            for i, k in enumerate(id_keys):
                r = reader.read_image(int(k))
                if r.label is None or r.label.size < 2:
                    raise RecordIOError(
                        f"{self.rec_path}: identity record key {int(k)} at offset "
                        f"{reader.offset_of(int(k))} has no [start, end) label vector"
                    )
                ranges[i] = (int(r.label[0]), int(r.label[1]))
            self.identity_ranges = ranges
            n_classes = len(id_keys)
            if num_classes is not None and num_classes != n_classes:
                raise ValueError(
                    f"{self.rec_path}: num_classes={num_classes} but the file has {n_classes} "
                    "identity records; drop num_classes or fix the file"
                )
            num_classes = n_classes
            pos = found[: len(img_keys)]
        else:
            self.layout = "plain"
            pos = np.argsort(offsets, kind="stable")  # file order is the natural order
        self.image_keys = keys[pos]
        self.image_offsets = offsets[pos]
        labels_f, self._data_start, self._data_len = self._scan_headers(reader)
        self.labels = self._validate_labels(labels_f, num_classes)
        if num_classes is None:
            num_classes = int(self.labels.max()) + 1 if len(self.labels) else 0
        self.num_classes = int(num_classes)
        self.class_counts = np.bincount(self.labels, minlength=self.num_classes).astype(np.int64)

    def _scan_headers(self, reader: RecordReader) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Reads label and image span of every image record, vectorised over the map.

        Returns:
            ``(labels [N] float64, data_start [N] int64, data_len [N] int64)``;
            ``data_start`` is -1 for multi-part records (read through the slow path).
        """
        n = len(self.image_offsets)
        labels = np.empty(n, dtype=np.float64)
        start = np.full(n, -1, dtype=np.int64)
        length = np.zeros(n, dtype=np.int64)
        size = reader.size
        buf = np.frombuffer(reader.buffer, dtype=np.uint8) if size else np.zeros(0, np.uint8)
        span = np.arange(8 + IR_SIZE + 4, dtype=np.int64)
        try:
            for lo in range(0, n, _CHUNK):
                offs = self.image_offsets[lo : lo + _CHUNK]
                fits = offs + len(span) <= size
                raw = np.zeros((len(offs), len(span)), dtype=np.uint8)
                raw[fits] = buf[offs[fits, None] + span]
                w = raw.view("<u4")
                magic, lrec, flag = w[:, 0], w[:, 1], w[:, 2].astype(np.int64)
                cflag, plen = lrec >> 29, (lrec & _LEN_MASK).astype(np.int64)
                scalar = raw[:, 12:16].copy().view("<f4")[:, 0]
                vec0 = raw[:, 32:36].copy().view("<f4")[:, 0]
                simple = fits & (magic == MAGIC) & (cflag == 0) & (plen >= IR_SIZE + 4 * flag)
                simple &= offs + 8 + plen <= size
                idx = np.nonzero(simple)[0]
                g = lo + idx
                labels[g] = np.where(flag[idx] > 0, vec0[idx], scalar[idx])
                start[g] = offs[idx] + 8 + IR_SIZE + 4 * flag[idx]
                length[g] = plen[idx] - IR_SIZE - 4 * flag[idx]
                for j in np.nonzero(~simple)[0]:
                    # Slow path: multi-part records, or errors that need a precise message.
                    off = int(offs[j])
                    rec = unpack_image_record(reader.read_at(off), f"{self.rec_path} at offset {off}")
                    labels[lo + j] = rec.scalar_label
                    if len(span) + off <= size and int(cflag[j]) == 0 and magic[j] == MAGIC:
                        start[lo + j] = off + 8 + IR_SIZE + 4 * rec.header.flag
                        length[lo + j] = len(rec.payload)
        finally:
            del buf  # the map cannot be closed while a numpy view exists
        return labels, start, length

    def _validate_labels(self, labels_f: np.ndarray, num_classes: int | None) -> np.ndarray:
        bad = ~np.isfinite(labels_f) | (labels_f < 0) | (labels_f != np.floor(labels_f))
        if num_classes is not None:
            bad |= labels_f >= num_classes
        if bad.any():
            i = int(np.nonzero(bad)[0][0])
            hi = "" if num_classes is None else f", {num_classes})"
            rng = f"[0{hi}" if num_classes is not None else "non-negative integers"
            raise RecordIOError(
                f"{self.rec_path}: image record key {int(self.image_keys[i])} at offset "
                f"{int(self.image_offsets[i])} has label {float(labels_f[i])!r} outside {rng}; "
                f"{int(bad.sum())} record(s) affected. Re-pack the data or pass the right "
                "num_classes."
            )
        return labels_f.astype(np.int64)

    # -------------------------------------------------------------------------- access

    def __len__(self) -> int:
        return len(self.image_keys)

    def _open(self) -> RecordReader:
        # A forked DataLoader worker must not share the parent's map/file position.
        if self._reader is None or self._pid != os.getpid():
            self._reader = RecordReader(self.rec_path, self.idx_path if self.idx_path else False)
            self._u8 = None
            self._pid = os.getpid()
        return self._reader

    def encoded_image(self, i: int) -> np.ndarray:
        """Encoded image bytes of image ``i`` (0-based position, not key).

        Returns:
            ``[L] uint8`` array; a zero-copy view of the memory map for
            single-part records.
        """
        reader = self._open()
        s = int(self._data_start[i])
        if s >= 0:
            if self._u8 is None:
                self._u8 = np.frombuffer(reader.buffer, dtype=np.uint8)
            return self._u8[s : s + int(self._data_len[i])]
        off = int(self.image_offsets[i])
        rec = unpack_image_record(reader.read_at(off), f"{self.rec_path} at offset {off}")
        return np.frombuffer(rec.payload, dtype=np.uint8)

    def where(self, i: int) -> str:
        """Human-readable location of image ``i`` for error messages."""
        return f"{self.rec_path} key {int(self.image_keys[i])} at offset {int(self.image_offsets[i])}"

    def write_image_index(self, path: str | os.PathLike[str]) -> Path:
        """Writes an ``.idx`` listing only the image records (for DALI's reader).

        DALI decodes every record its index lists, so the insightface header and
        identity records must be left out.
        """
        order = np.argsort(self.image_offsets, kind="stable")
        write_index(path, self.image_keys[order], self.image_offsets[order])
        return Path(path)

    def image_index_path(self, cache_dir: str | os.PathLike[str] | None = None) -> Path:
        """Returns (writing on first use) an image-only index for DALI's reader.

        Written next to the data as ``<name>.images.idx`` when that directory is
        writable, else under ``cache_dir`` (default: the system temp dir).
        """
        if self.layout == "plain" and self.idx_path:
            return Path(self.idx_path)
        st = os.stat(self.rec_path)
        tag = hashlib.sha1(f"{os.path.abspath(self.rec_path)}:{st.st_size}:{st.st_mtime_ns}".encode())
        name = f"{Path(self.rec_path).stem}.{tag.hexdigest()[:12]}.images.idx"
        candidates = []
        if cache_dir is not None:
            candidates.append(Path(cache_dir))
        candidates += [Path(self.rec_path).parent, Path(tempfile.gettempdir()) / "dali_pipelines"]
        for d in candidates:
            p = d / name
            if p.exists():
                return p
            try:
                d.mkdir(parents=True, exist_ok=True)
                return self.write_image_index(p)
            except OSError:
                continue
        raise OSError(f"no writable directory for the DALI image index of {self.rec_path}; pass cache_dir")

    def close(self) -> None:
        """Releases the memory map."""
        self._u8 = None
        if self._reader is not None and self._pid == os.getpid():
            self._reader.close()
        self._reader = None

    def __getstate__(self) -> dict[str, object]:
        state = dict(self.__dict__)
        state["_reader"] = None
        state["_u8"] = None
        return state



class InsightFaceWriter:
    """Writes a ``.rec``/``.idx`` pair in insightface layout.

    Images must arrive grouped by class, classes in order 0, 1, 2, ... (a class
    may not reappear after the next one started). Use as a context manager; the
    identity records and the final header are written on close.

    Args:
        rec_path: Output ``.rec``.
        idx_path: Output ``.idx`` (default: ``rec_path`` with ``.idx``).
    """

    def __init__(self, rec_path: str | os.PathLike[str], idx_path: str | os.PathLike[str] | None = None):
        from .recordio import RecordWriter, pack_image_record

        self._pack = pack_image_record
        self._w = RecordWriter(rec_path, idx_path or Path(rec_path).with_suffix(".idx"))
        self._header_offset = self._w.write(0, pack_image_record([0.0, 0.0], b"", id=0))
        self._next_key = 1
        self._ranges: list[tuple[int, int]] = []
        self.num_images = 0

    def add(self, label: int, jpeg: bytes) -> int:
        """Appends one image of class ``label``; returns its key."""
        label = int(label)
        n = len(self._ranges)
        if label == n:
            self._ranges.append((self._next_key, self._next_key))
        elif label != n - 1:
            raise ValueError(
                f"InsightFaceWriter: got class {label} after class {n - 1}; write images grouped "
                "by class with classes numbered 0, 1, 2, ... in order"
            )
        key = self._next_key
        if key >= 1 << 24:
            raise ValueError("insightface layout stores keys as float32: at most 2**24 records")
        self._w.write_image(key, float(label), jpeg)
        s, _ = self._ranges[label]
        self._ranges[label] = (s, key + 1)
        self._next_key += 1
        self.num_images += 1
        return key

    @property
    def num_classes(self) -> int:
        """Classes written so far."""
        return len(self._ranges)

    def close(self) -> None:
        """Writes identity records and the header record, then the index."""
        if self._w._f.closed:
            return
        first_id = self._next_key
        for c, (s, e) in enumerate(self._ranges):
            self._w.write(first_id + c, self._pack([float(s), float(e)], b"", id=first_id + c))
        end = first_id + len(self._ranges)
        self._w.overwrite(self._header_offset, self._pack([float(first_id), float(end)], b"", id=0))
        self._w.close()

    def __enter__(self) -> InsightFaceWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

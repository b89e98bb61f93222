"""Face datasets stored as RecordIO: layout detection, labels, class counts, shards.

Two layouts are understood (see docs/data.md):

* ``insightface``: record 0 is a header record (``flag > 0``, no image) whose
  label vector ``[a, b]`` says that keys ``1 .. a-1`` are image records and keys
  ``a .. b-1`` are identity records, one per class in class order, each with a
  label vector ``[start, end)`` of the image keys of that identity.
* ``plain``: every record is an image record (e.g. written by im2rec). Records
  may be in any order; the number of classes is ``max(label) + 1`` unless given.

A dataset is one ``.rec``, a shard manifest (``.json`` written by ``pack
--shards``) or a list of plain-layout ``.rec`` shards sharing one label space;
images are numbered across shards in shard order.

Image labels are read from every image record's header (vectorised over the
memory map) and validated; the result (offsets, JPEG byte ranges, labels, class
counts) is kept in a binary index cache (``index_cache``) that every rank
memory-maps, so the second and later opens take a fraction of a second and the
ranks of a node share one copy of the arrays.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from . import index_cache
from .index_cache import Source
from .recordio import (
    IR_SIZE,
    MAGIC,
    RecordIOError,
    RecordReader,
    _read_framed,
    unpack_image_record,
    write_index,
)

Layout = Literal["auto", "insightface", "plain"]
_LEN_MASK = (1 << 29) - 1
_CHUNK = 1 << 20

#: Keys (images + identities + header) an insightface file can hold: float32 labels.
INSIGHTFACE_MAX_RECORDS = 1 << 24

#: ``format`` field of a shard manifest.
MANIFEST_FORMAT = "partial-fc-shards"
MANIFEST_VERSION = 1

DatasetPath = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Reads and checks a shard manifest; shard paths are made absolute.

    Raises:
        RecordIOError: Not a manifest, a version this code does not know, or a
            shard file missing; the message names the manifest and the shard.
    """
    p = Path(path)
    try:
        m = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise RecordIOError(f"{p}: not a readable shard manifest: {e}") from None
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        raise RecordIOError(f"{p}: not a shard manifest (expected \"format\": \"{MANIFEST_FORMAT}\")")
    if int(m.get("version", -1)) > MANIFEST_VERSION:
        raise RecordIOError(f"{p}: manifest version {m.get('version')} is newer than this code "
                            f"understands ({MANIFEST_VERSION}); update partial-fc")
    for i, sh in enumerate(m.get("shards", [])):
        for k in ("rec", "idx"):
            f = p.parent / sh[k]
            if not f.is_file():
                raise RecordIOError(f"{p}: shard {i} file {f} is missing")
            sh[k] = str(f)
    if not m.get("shards"):
        raise RecordIOError(f"{p}: manifest lists no shards")
    return m


def resolve_sources(path: DatasetPath, idx_path: str | os.PathLike[str] | None = None
                    ) -> tuple[list[Source], dict[str, Any] | None]:
    """``(sources, manifest or None)`` of a ``.rec``, a manifest ``.json`` or a list of ``.rec``."""
    if isinstance(path, (list, tuple)):
        if idx_path is not None:
            raise ValueError("idx_path applies to a single .rec; shards use the .idx next to each")
        paths = [str(p) for p in path]
        if len(paths) == 1:
            return resolve_sources(paths[0])
        if not paths:
            raise ValueError("an empty list of shards")
        out = []
        for p in paths:
            idx = Path(p).with_suffix(".idx")
            if not idx.is_file():
                raise RecordIOError(f"{p}: shard has no .idx next to it ({idx})")
            out.append(Source(p, str(idx)))
        return out, None
    p = str(path)
    if p.endswith(".json"):
        m = read_manifest(p)
        return [Source(sh["rec"], sh["idx"]) for sh in m["shards"]], m
    if idx_path is None or idx_path is True:
        guess = Path(p).with_suffix(".idx")
        return [Source(p, str(guess) if guess.exists() else None)], None
    if idx_path is False:
        return [Source(p, None)], None
    return [Source(p, str(idx_path))], None


# ----------------------------------------------------------------------------- index building


def _scan_headers(reader: RecordReader, offsets: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reads label and image span of every image record, vectorised over the map.

    Returns:
        ``(labels [N] float64, data_start [N] int64, data_len [N] int64)``;
        ``data_start`` is -1 for multi-part records (read through the slow path).
    """
    path = reader.rec_path
    n = len(offsets)
    labels = np.empty(n, dtype=np.float64)
    start = np.full(n, -1, dtype=np.int64)
    length = np.zeros(n, dtype=np.int64)
    size = reader.size
    # RecordIO records start at multiples of 4: gather the five header words we need
    # (magic, lrec, flag, scalar label, first vector label) as uint32, one 1-D gather
    # each, instead of a [N, 36] byte matrix.
    words = np.frombuffer(reader.buffer, dtype="<u4", count=size // 4) if size >= 4 else np.zeros(0, "<u4")
    nw = len(words)
    try:
        for lo in range(0, n, _CHUNK):
            offs = offsets[lo : lo + _CHUNK]
            o4 = offs >> 2
            fits = ((offs & 3) == 0) & (offs >= 0) & (o4 + 9 <= nw)
            o4 = np.where(fits, o4, 0)
            magic, lrec, flag = words[o4], words[o4 + 1], words[o4 + 2].astype(np.int64)
            scalar = words[o4 + 3].view("<f4")
            vec0 = words[o4 + 8].view("<f4")
            cflag, plen = lrec >> 29, (lrec & _LEN_MASK).astype(np.int64)
            simple = fits & (magic == MAGIC) & (cflag == 0) & (plen >= IR_SIZE + 4 * flag)
            simple &= offs + 8 + plen <= size
            if simple.all():
                labels[lo : lo + len(offs)] = np.where(flag > 0, vec0, scalar)
                start[lo : lo + len(offs)] = offs + 8 + IR_SIZE + 4 * flag
                length[lo : lo + len(offs)] = plen - IR_SIZE - 4 * flag
                continue
            idx = np.nonzero(simple)[0]
            g = lo + idx
            labels[g] = np.where(flag[idx] > 0, vec0[idx], scalar[idx])
            start[g] = offs[idx] + 8 + IR_SIZE + 4 * flag[idx]
            length[g] = plen[idx] - IR_SIZE - 4 * flag[idx]
            for j in np.nonzero(~simple)[0]:
                # Slow path: multi-part or short records, or errors that need a precise message.
                off = int(offs[j])
                rec = unpack_image_record(reader.read_at(off), f"{path} at offset {off}")
                labels[lo + j] = rec.scalar_label
                if off + 8 <= size and int.from_bytes(reader.buffer[off + 4 : off + 8], "little") >> 29 == 0:
                    start[lo + j] = off + 8 + IR_SIZE + 4 * rec.header.flag
                    length[lo + j] = len(rec.payload)
    finally:
        del words  # the map cannot be closed while a numpy view exists
    return labels, start, length


def _check_labels(path: str, keys: np.ndarray, offsets: np.ndarray, labels_f: np.ndarray,
                  num_classes: int | None) -> None:
    """Raises naming the first image whose label is not an integer in ``[0, num_classes)``."""
    bad = ~np.isfinite(labels_f) | (labels_f < 0) | (labels_f != np.floor(labels_f))
    if num_classes is not None:
        bad |= labels_f >= num_classes
    if bad.any():
        i = int(np.nonzero(bad)[0][0])
        rng = f"[0, {num_classes})" if num_classes is not None else "non-negative integers"
        raise RecordIOError(
            f"{path}: image record key {int(keys[i])} at offset {int(offsets[i])} has label "
            f"{float(labels_f[i])!r} outside {rng}; {int(bad.sum())} record(s) affected. Re-pack "
            "the data or pass the right num_classes."
        )


def _build_one(src: Source, layout: Layout) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Index arrays of one ``.rec`` from its ``.idx`` and record headers (the slow path)."""
    reader = RecordReader(src.rec, src.idx if src.idx is not None else False)
    try:
        keys, offsets = reader.keys, reader.offsets
        if len(keys) == 0:
            raise RecordIOError(f"{src.rec}: file contains no records")
        header = None
        if layout in ("auto", "insightface") and reader.has_key(0):
            rec0 = reader.read_image(0)
            h = rec0.header
            if h.flag > 0 and rec0.label is not None and rec0.label.size >= 2 and not rec0.payload:
                header = rec0
        if layout == "insightface" and header is None:
            raise RecordIOError(
                f"{src.rec}: layout='insightface' but record 0 is not a header record "
                "(flag > 0, label vector [first_identity_key, end_key], no image); "
                "use layout='plain' or 'auto'"
            )
        arrays: dict[str, np.ndarray] = {}
        num_classes: int | None = None
        if header is not None:
            found_layout = "insightface"
            assert header.label is not None
            a, b = int(header.label[0]), int(header.label[1])
            if not (1 <= a <= b):
                raise RecordIOError(
                    f"{src.rec}: header record 0 has invalid ranges [{a}, {b}] at offset "
                    f"{reader.offset_of(0)}; expected 1 <= first_identity_key <= end_key"
                )
            img_keys = np.arange(1, a, dtype=np.int64)
            id_keys = np.arange(a, b, dtype=np.int64)
            all_keys = np.concatenate([img_keys, id_keys])
            found = reader.positions(all_keys)
            if (found < 0).any():
                missing = all_keys[found < 0]
                raise RecordIOError(
                    f"{src.idx or src.rec}: header says keys 1..{b - 1} exist but "
                    f"{len(missing)} are missing (first: {int(missing[0])})"
                )
            ranges = np.zeros((len(id_keys), 2), dtype=np.int64)
            for i, k in enumerate(id_keys):
                r = reader.read_image(int(k))
                if r.label is None or r.label.size < 2:
                    raise RecordIOError(
                        f"{src.rec}: identity record key {int(k)} at offset "
                        f"{reader.offset_of(int(k))} has no [start, end) label vector"
                    )
                ranges[i] = (int(r.label[0]), int(r.label[1]))
            arrays["identity_ranges"] = ranges
            num_classes = len(id_keys)
            pos = found[: len(img_keys)]
        else:
            found_layout = "plain"
            # File order is the natural order (already sorted when written by pack).
            pos = None if bool((offsets[1:] > offsets[:-1]).all()) else np.argsort(offsets, kind="stable")
        image_keys = keys if pos is None else keys[pos]
        image_offsets = offsets if pos is None else offsets[pos]
        if len(image_keys) == 0:
            raise RecordIOError(f"{src.rec}: the file holds no image records")
        labels_f, start, length = _scan_headers(reader, image_offsets)
        _check_labels(src.rec, image_keys, image_offsets, labels_f, num_classes)
        labels = labels_f.astype(np.int64)
        if num_classes is None:
            num_classes = int(labels.max()) + 1 if len(labels) else 0
        arrays.update(keys=image_keys, offsets=image_offsets, data_start=start, data_len=length,
                      labels=labels)
        meta = {"layout": found_layout, "num_images": len(labels), "num_classes": int(num_classes),
                "label_min": int(labels.min()), "label_max": int(labels.max())}
        return meta, arrays
    finally:
        reader.close()


def build_index(sources: Sequence[Source], layout: Layout) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Index arrays of a dataset (one file or plain shards), as stored in the cache.

    Arrays (``N`` images over all shards, ``C`` classes): ``keys, offsets,
    data_start, data_len, labels`` ``[N] int64``, ``class_counts [C] int64``,
    ``shard [N] uint16`` (several sources) and ``identity_ranges [C, 2] int64``
    (insightface). ``data_start`` is -1 for multi-part records.
    """
    parts = []
    for i, src in enumerate(sources):
        meta, arrays = _build_one(src, layout if len(sources) == 1 else "plain")
        if len(sources) > 1 and meta["layout"] != "plain":
            raise RecordIOError(f"{src.rec}: shard {i} is not in plain layout; only plain shards "
                                "(labels in every record, one label space) can be combined")
        parts.append((meta, arrays))
    if len(parts) == 1:
        meta, arrays = parts[0]
    else:
        arrays = {k: np.concatenate([a[k] for _, a in parts])
                  for k in ("keys", "offsets", "data_start", "data_len", "labels")}
        if len(parts) > np.iinfo(np.uint16).max:
            raise ValueError(f"{len(parts)} shards; at most 65535 are supported")
        arrays["shard"] = np.repeat(np.arange(len(parts), dtype=np.uint16),
                                    [m["num_images"] for m, _ in parts])
        labels = arrays["labels"]
        meta = {"layout": "plain", "num_images": int(len(labels)),
                "num_classes": int(labels.max()) + 1,
                "label_min": int(labels.min()), "label_max": int(labels.max())}
    meta["shards"] = [{"rec": s.rec, "images": m["num_images"], "label_min": m["label_min"],
                       "label_max": m["label_max"]} for s, (m, _) in zip(sources, parts)]
    arrays["class_counts"] = np.bincount(arrays["labels"], minlength=meta["num_classes"]).astype(np.int64)
    return meta, arrays


# ----------------------------------------------------------------------------- dataset


class FaceRecordDataset:
    """Image records of a face dataset with validated integer labels.

    Args:
        rec_path: A ``.rec`` file, a shard manifest ``.json`` (``pack --shards``)
            or a list of plain-layout ``.rec`` shards (each with its ``.idx``).
        idx_path: The ``.idx`` of a single ``.rec`` (None: next to it if present,
            else scan; False: always scan).
        layout: ``"auto"`` detects an insightface header record at key 0.
        num_classes: For ``plain`` files, the class count to validate against
            (default ``max(label) + 1``). For insightface files it must equal the
            number of identity records if given.
        cache_dir: Where the binary index cache lives (default: ``.pfc-index``
            next to the data, else ``$PFC_INDEX_CACHE`` or ``~/.cache/partial-fc/index``).
        cache: False builds the index in memory and writes no cache.

    Attributes:
        layout: ``"insightface"`` or ``"plain"``.
        sources: The ``index_cache.Source`` files, in shard order.
        image_keys: ``[N] int64`` index keys of the image records (per shard).
        image_offsets: ``[N] int64`` byte offsets of the image records (in their shard).
        labels: ``[N] int64`` class of each image record.
        num_classes: Number of classes ``C``.
        class_counts: ``[C] int64`` images per class.
        identity_ranges: ``[C, 2] int64`` ``[start, end)`` image keys per class
            (insightface layout only, else None).

    The arrays are read-only memory maps of the index cache (shared between
    processes through the page cache).

    Raises:
        RecordIOError: Malformed file, index beyond EOF, or a label outside
            ``[0, num_classes)``; the message names file, key and offset.
    """

    def __init__(
        self,
        rec_path: DatasetPath,
        idx_path: str | os.PathLike[str] | None = None,
        *,
        layout: Layout = "auto",
        num_classes: int | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        cache: bool = True,
    ) -> None:
        self.sources, self.manifest = resolve_sources(rec_path, idx_path)
        self.path = str(rec_path) if not isinstance(rec_path, (list, tuple)) else str(rec_path[0])
        self.rec_path = self.sources[0].rec if len(self.sources) == 1 else self.path
        self.idx_path = self.sources[0].idx if len(self.sources) == 1 else None
        for s in self.sources:
            if not os.path.isfile(s.rec):
                raise FileNotFoundError(f"{s.rec}: no such .rec file")
        name = Path(self.path).name  # with its suffix: train.rec and train.json are different datasets

        def build() -> tuple[dict[str, Any], dict[str, np.ndarray]]:
            return build_index(self.sources, layout)

        if cache:
            meta, arrays, self.cache_path = index_cache.open_index(self.sources, layout, name, build, cache_dir)
        else:
            meta, arrays = build()
            self.cache_path = None
        self._set_arrays(meta, arrays)
        self._check(num_classes)
        self._pid = os.getpid()
        self._maps: list[tuple[Any, mmap.mmap | bytes, np.ndarray] | None] = [None] * len(self.sources)

    def _set_arrays(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.meta = meta
        self.layout: str = meta["layout"]
        self.image_keys = arrays["keys"]
        self.image_offsets = arrays["offsets"]
        self.labels = arrays["labels"]
        # Plain ndarray views of the same maps for the per-image path (np.memmap's
        # Python-level __getitem__ costs ~1 us per scalar read).
        self._data_start = arrays["data_start"].view(np.ndarray)
        self._data_len = arrays["data_len"].view(np.ndarray)
        self._shard = arrays["shard"].view(np.ndarray) if "shard" in arrays else None
        # A private, writable copy ([C] int64, 16 MB at 2M classes): the head wraps it in a tensor.
        self.class_counts = np.array(arrays["class_counts"], dtype=np.int64)
        self.identity_ranges = arrays.get("identity_ranges")
        self.num_classes = int(meta["num_classes"])

    def _check(self, num_classes: int | None) -> None:
        m = self.manifest
        if m is not None:
            for i, (sh, got) in enumerate(zip(m["shards"], self.meta["shards"])):
                if int(sh.get("images", got["images"])) != got["images"]:
                    raise RecordIOError(f"{self.path}: shard {i} ({sh['rec']}) has {got['images']} image "
                                        f"records but the manifest says {sh['images']}; re-pack or "
                                        "run `pfc pack --verify`")
            if "num_classes" in m and num_classes is None:
                num_classes = int(m["num_classes"])
        if num_classes is None:
            return
        if self.layout == "insightface":
            if num_classes != self.num_classes:
                raise ValueError(
                    f"{self.rec_path}: num_classes={num_classes} but the file has {self.num_classes} "
                    "identity records; drop num_classes or fix the file"
                )
            return
        if int(self.meta["label_max"]) >= num_classes:
            i = int(np.argmax(np.asarray(self.labels) >= num_classes))
            _check_labels(self._file_of(i), self.image_keys[i : i + 1], self.image_offsets[i : i + 1],
                          self.labels[i : i + 1].astype(np.float64), num_classes)
        self.num_classes = int(num_classes)
        if len(self.class_counts) < num_classes:
            cc = np.zeros(num_classes, dtype=np.int64)
            cc[: len(self.class_counts)] = self.class_counts
            self.class_counts = cc

    # -------------------------------------------------------------------------- access

    def __len__(self) -> int:
        return len(self.image_keys)

    @property
    def num_shards(self) -> int:
        """Files the dataset spans."""
        return len(self.sources)

    def _shard_of(self, i: int) -> int:
        return 0 if self._shard is None else int(self._shard[i])

    def _file_of(self, i: int) -> str:
        return self.sources[self._shard_of(i)].rec

    def _map(self, s: int) -> tuple[Any, mmap.mmap | bytes, np.ndarray]:
        # A forked DataLoader worker must not share the parent's map/file position.
        if self._pid != os.getpid():
            self._maps = [None] * len(self.sources)
            self._pid = os.getpid()
        m = self._maps[s]
        if m is None:
            f = open(self.sources[s].rec, "rb")
            size = os.fstat(f.fileno()).st_size
            mm: mmap.mmap | bytes = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
            m = (f, mm, np.frombuffer(mm, dtype=np.uint8) if size else np.zeros(0, np.uint8))
            self._maps[s] = m
        return m

    def encoded_image(self, i: int) -> np.ndarray:
        """Encoded image bytes of image ``i`` (0-based position over all shards, not key).

        Returns:
            ``[L] uint8`` array; a zero-copy view of the memory map for
            single-part records.
        """
        s = self._shard_of(i)
        _, mm, u8 = self._map(s)
        start = int(self._data_start[i])
        if start >= 0:
            end = start + int(self._data_len[i])
            if end > len(u8):
                raise RecordIOError(f"{self.where(i)}: record ends at {end}, beyond the end of the "
                                    f"file ({len(u8)} bytes); the file changed after it was indexed")
            return u8[start:end]
        off = int(self.image_offsets[i])
        path = self.sources[s].rec
        rec = unpack_image_record(_read_framed(mm, off, path)[0], f"{path} at offset {off}")
        return np.frombuffer(rec.payload, dtype=np.uint8)

    def where(self, i: int) -> str:
        """Human-readable location of image ``i`` for error messages."""
        s = self._shard_of(i)
        shard = f" (shard {s})" if len(self.sources) > 1 else ""
        return f"{self.sources[s].rec}{shard} key {int(self.image_keys[i])} at offset {int(self.image_offsets[i])}"

    def write_image_index(self, path: str | os.PathLike[str]) -> Path:
        """Writes an ``.idx`` listing only the image records (for DALI's reader; one file only).

        DALI decodes every record its index lists, so the insightface header and
        identity records must be left out.
        """
        if len(self.sources) > 1:
            raise ValueError("write_image_index works on a single .rec; shards have their own .idx")
        order = np.argsort(self.image_offsets, kind="stable")
        write_index(path, self.image_keys[order], self.image_offsets[order])
        return Path(path)

    def dali_reader_inputs(self, cache_dir: str | os.PathLike[str] | None = None) -> tuple[list[str], str]:
        """``(rec files, one image-only index)`` for DALI's ``fn.readers.mxnet``.

        DALI's RecordIO reader takes several ``.rec`` files but a single index,
        whose offsets count from the start of the first file through the
        concatenation of all of them; for shards that index is written once
        (into the index cache entry, else ``cache_dir`` or the temp dir).
        """
        if len(self.sources) == 1:
            return [self.sources[0].rec], str(self.image_index_path(cache_dir))
        sizes = np.array([os.path.getsize(s.rec) for s in self.sources], dtype=np.int64)
        base = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        assert self._shard is not None
        tag = hashlib.sha1(json.dumps([[os.path.abspath(s.rec), int(z)] for s, z in
                                       zip(self.sources, sizes)]).encode()).hexdigest()[:12]
        dirs = [Path(self.cache_path)] if self.cache_path is not None else []
        dirs += [Path(cache_dir)] if cache_dir is not None else []
        dirs += [Path(tempfile.gettempdir()) / "dali_pipelines"]
        for d in dirs:
            p = d / f"{Path(self.path).stem}.{tag}.dali.idx"
            if p.exists():
                return [s.rec for s in self.sources], str(p)
            try:
                d.mkdir(parents=True, exist_ok=True)
                offs = base[np.asarray(self._shard, dtype=np.int64)] + np.asarray(self.image_offsets)
                write_index(p, np.arange(len(offs), dtype=np.int64), offs)
                return [s.rec for s in self.sources], str(p)
            except OSError:
                continue
        raise OSError(f"no writable directory for the DALI index of {self.path}; pass cache_dir")

    def image_index_path(self, cache_dir: str | os.PathLike[str] | None = None) -> Path:
        """Returns (writing on first use) an image-only index for DALI's reader.

        Written next to the data as ``<name>.images.idx`` when that directory is
        writable, else under ``cache_dir`` (default: the system temp dir).
        """
        if len(self.sources) > 1:
            raise ValueError("a sharded dataset has one index per shard; use dali_reader_inputs()")
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
        """Releases the memory maps of the data files."""
        if self._pid == os.getpid():
            for m in self._maps:
                if m is None:
                    continue
                f, mm, _ = m
                if isinstance(mm, mmap.mmap):
                    try:
                        mm.close()
                    except BufferError:
                        pass  # numpy views still alive; the map goes when they do
                f.close()
        self._maps = [None] * len(self.sources)

    def __getstate__(self) -> dict[str, object]:
        state = dict(self.__dict__)
        state["_maps"] = [None] * len(self.sources)
        if self.cache_path is not None:
            # Spawned workers re-map the cache instead of receiving copies of the arrays.
            for k in ("image_keys", "image_offsets", "labels", "_data_start", "_data_len", "_shard",
                      "class_counts", "identity_ranges"):
                state[k] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.cache_path is not None and self.labels is None:
            meta, arrays = index_cache.load_entry(self.cache_path)
            num_classes = self.num_classes
            self._set_arrays(meta, arrays)
            self.num_classes = num_classes
            if len(self.class_counts) < num_classes:
                cc = np.zeros(num_classes, dtype=np.int64)
                cc[: len(self.class_counts)] = self.class_counts
                self.class_counts = cc


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
        if key >= INSIGHTFACE_MAX_RECORDS:
            raise ValueError("insightface layout stores keys as float32: at most 2**24 records; "
                             "use the plain layout (pack --layout plain or --shards N)")
        self._w.write_image(key, float(label), jpeg)
        s, _ = self._ranges[label]
        self._ranges[label] = (s, key + 1)
        self._next_key += 1
        self.num_images += 1
        return key

    def add_empty_class(self) -> int:
        """Appends a class without images (``[k, k)``), e.g. an identity whose files all failed."""
        self._ranges.append((self._next_key, self._next_key))
        return len(self._ranges) - 1

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

    def abort(self) -> None:
        """Deletes the partial ``.rec`` and writes no ``.idx``."""
        self._w.abort()

    def __enter__(self) -> InsightFaceWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None:
            self.abort()  # an interrupted write leaves no valid-looking, shorter dataset
        else:
            self.close()

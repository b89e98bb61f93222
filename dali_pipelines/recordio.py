"""MXNet-compatible RecordIO reading and writing, without MXNet.

File layout (little-endian), as implemented here and checked against DALI's
``fn.readers.mxnet`` in the tests:

* A record is one or more *parts*. Each part is ``uint32 magic (0xced7230a)``,
  ``uint32 lrec`` (top 3 bits: continuation flag ``cflag``, low 29 bits: part
  length), the part payload, then zero padding to a multiple of 4 bytes.
* ``cflag`` is 0 for a single-part record and 1/2/3 for the first/middle/last
  part of a multi-part record. The writer splits a record wherever the magic
  word occurs at a 4-byte aligned position inside the payload and drops that
  word; the reader puts it back between parts. That keeps a reader that
  resynchronises on the magic word from mistaking payload bytes for a record
  start.
* An *image record* payload starts with the 24-byte ``IRHeader`` (struct
  ``<IfQQ``: flag, label, id, id2). When ``flag > 0`` a float32 label vector of
  ``flag`` elements follows the header and ``label`` is ignored. The rest is the
  encoded image (or nothing, for header-only records).
* The ``.idx`` file is text, one ``key<TAB>offset`` line per record; the
  offset is that of the record's first part.
"""

from __future__ import annotations

import mmap
import os
import struct
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LEN_MASK = (1 << 29) - 1
MAX_PART_LENGTH = _LEN_MASK
IR_FORMAT = "<IfQQ"
IR_SIZE = struct.calcsize(IR_FORMAT)  # 24


class RecordIOError(ValueError):
    """A RecordIO file or index is malformed; the message names the file and offset."""


class IRHeader(NamedTuple):
    """Image record header (MXNet ``IRHeader``).

    Attributes:
        flag: 0 for a scalar label, else the length of the label vector.
        label: Scalar float label (meaningful when ``flag == 0``).
        id: First 64-bit id (often the record key).
        id2: Second 64-bit id.
    """

    flag: int
    label: float
    id: int
    id2: int


@dataclass(frozen=True)
class ImageRecord:
    """A decoded image record.

    Attributes:
        header: The record's ``IRHeader``.
        label: Label vector ``[flag]`` float32 when ``header.flag > 0``, else None.
        payload: The encoded image bytes (may be empty for header records).
    """

    header: IRHeader
    label: np.ndarray | None
    payload: bytes

    @property
    def scalar_label(self) -> float:
        """The class label: ``label[0]`` for vector labels, else ``header.label``."""
        if self.label is not None and self.label.size > 0:
            return float(self.label[0])
        return float(self.header.label)


# ----------------------------------------------------------------------------- image records


def pack_image_record(
    label: float | Sequence[float] | np.ndarray, payload: bytes, id: int = 0, id2: int = 0
) -> bytes:
    """Builds an image-record payload: ``IRHeader`` (+ label vector) + image bytes.

    Args:
        label: A scalar label (stored in the header, ``flag = 0``) or a sequence of
            floats (stored as a float32 vector after the header, ``flag = len``).
        payload: Encoded image bytes, possibly empty.
        id: Header ``id`` field.
        id2: Header ``id2`` field.

    Returns:
        The record payload, ready for ``RecordWriter.write``.
    """
    if isinstance(label, (int, float, np.integer, np.floating)):
        head = struct.pack(IR_FORMAT, 0, float(label), int(id), int(id2))
        return head + bytes(payload)
    vec = np.asarray(label, dtype="<f4").reshape(-1)
    if vec.size == 0:
        raise ValueError("label vector is empty; pass a scalar label or at least one value")
    head = struct.pack(IR_FORMAT, int(vec.size), 0.0, int(id), int(id2))
    return head + vec.tobytes() + bytes(payload)


def unpack_image_record(buf: bytes | memoryview, where: str = "<buffer>") -> ImageRecord:
    """Parses an image-record payload produced by ``pack_image_record`` or MXNet.

    Args:
        buf: The full record payload.
        where: Description of the record's location used in error messages.

    Returns:
        The parsed ``ImageRecord``.

    Raises:
        RecordIOError: The payload is shorter than its header claims.
    """
    if len(buf) < IR_SIZE:
        raise RecordIOError(f"{where}: record of {len(buf)} bytes is shorter than IRHeader")
    flag, label, id_, id2 = struct.unpack_from(IR_FORMAT, buf, 0)
    header = IRHeader(flag, label, id_, id2)
    if flag > 0:
        end = IR_SIZE + 4 * flag
        if len(buf) < end:
            raise RecordIOError(
                f"{where}: IRHeader flag={flag} needs {end} bytes but record has {len(buf)}"
            )
        vec = np.frombuffer(buf, dtype="<f4", count=flag, offset=IR_SIZE).copy()
        return ImageRecord(header, vec, bytes(buf[end:]))
    return ImageRecord(header, None, bytes(buf[IR_SIZE:]))


# ----------------------------------------------------------------------------- framing


def _pad4(n: int) -> int:
    return (4 - (n & 3)) & 3


def frame_record(payload: bytes | memoryview) -> bytes:
    """Frames one record payload into RecordIO parts (header, data, padding).

    Args:
        payload: Record payload of fewer than 2**29 bytes.

    Returns:
        The bytes to append to a ``.rec`` file.
    """
    data = bytes(payload)
    n = len(data)
    if n > MAX_PART_LENGTH:
        raise ValueError(f"record of {n} bytes exceeds the RecordIO limit of {MAX_PART_LENGTH}")
    # Split points: aligned occurrences of the magic word inside the payload.
    cuts: list[int] = []
    pos = data.find(_MAGIC_BYTES)
    while pos != -1:
        if pos % 4 == 0 and pos + 4 <= n:
            cuts.append(pos)
            pos = data.find(_MAGIC_BYTES, pos + 4)
        else:
            pos = data.find(_MAGIC_BYTES, pos + 1)
    out = bytearray()
    start = 0
    for i, cut in enumerate(cuts):
        cflag = 1 if i == 0 else 2
        out += _MAGIC_BYTES + struct.pack("<I", (cflag << 29) | (cut - start))
        out += data[start:cut]  # length is a multiple of 4: no padding between parts
        start = cut + 4
    last_flag = 3 if cuts else 0
    rest = n - start
    out += _MAGIC_BYTES + struct.pack("<I", (last_flag << 29) | rest)
    out += data[start:]
    out += b"\x00" * _pad4(rest)
    return bytes(out)


def _read_framed(buf: mmap.mmap | bytes, offset: int, path: str) -> tuple[bytes, int]:
    """Reads the record starting at ``offset``; returns (payload, offset of next record)."""
    size = len(buf)
    parts: list[bytes] = []
    pos = offset
    first = True
    while True:
        if pos + 8 > size:
            raise RecordIOError(
                f"{path}: truncated record at offset {pos} (file is {size} bytes; "
                "needs 8 bytes of part header)"
            )
        magic, lrec = struct.unpack_from("<II", buf, pos)
        if magic != MAGIC:
            raise RecordIOError(
                f"{path}: bad magic 0x{magic:08x} at offset {pos} (expected 0x{MAGIC:08x}); "
                "the file is not RecordIO or the index points inside a record"
            )
        cflag, length = lrec >> 29, lrec & _LEN_MASK
        begin = pos + 8
        end = begin + length
        if end > size:
            raise RecordIOError(
                f"{path}: truncated record at offset {pos}: part claims {length} bytes "
                f"but only {size - begin} remain"
            )
        if first and cflag not in (0, 1):
            raise RecordIOError(
                f"{path}: record at offset {pos} starts with continuation flag {cflag}; "
                "the index points into the middle of a multi-part record"
            )
        if not first and cflag not in (2, 3):
            raise RecordIOError(
                f"{path}: multi-part record broken at offset {pos} (continuation flag {cflag})"
            )
        if not first:
            parts.append(_MAGIC_BYTES)
        parts.append(bytes(buf[begin:end]))
        pos = end + _pad4(length)
        if cflag in (0, 3):
            return b"".join(parts), pos
        first = False


# ----------------------------------------------------------------------------- index


_IDX_CHUNK = 64 << 20  # bytes of .idx text parsed per vectorised step
# Byte classes of a text index: digits and '-' (token bytes), space/tab/CR/LF (separators).
_IDX_TOKEN = np.zeros(256, dtype=bool)
_IDX_TOKEN[np.frombuffer(b"0123456789-", dtype=np.uint8)] = True
_IDX_SPACE = np.zeros(256, dtype=bool)
_IDX_SPACE[np.frombuffer(b" \t\r\n", dtype=np.uint8)] = True


def _idx_line_error(idx_path: object, data: bytes, pos: int, base_line: int, why: str) -> RecordIOError:
    """An error naming the file and 1-based line number of byte ``pos`` of chunk ``data``."""
    lineno = base_line + data.count(b"\n", 0, pos)
    start = data.rfind(b"\n", 0, pos) + 1
    end = data.find(b"\n", pos)
    line = data[start : end if end >= 0 else len(data)][:80]
    return RecordIOError(f"{idx_path}:{lineno}: {why}, got {line!r}")


def _parse_index_chunk(idx_path: object, data: bytes, base_line: int) -> tuple[np.ndarray, np.ndarray]:
    """Parses whole lines of a ``.idx`` (vectorised); ``base_line`` is the first line's number."""
    # Fast path for the canonical "key<TAB>offset<LF>" form: deleting the digits must
    # leave exactly one TAB + LF per line, and numpy's C parser must read two
    # integers per line. Anything else (CRLF, blank lines, garbage) takes the
    # checked path below, which also finds the offending line for the message.
    lines = data.count(b"\n")
    if data.endswith(b"\n") and data.translate(None, b"0123456789-") == b"\t\n" * lines:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", DeprecationWarning)
                vals = np.fromstring(data, dtype=np.int64, sep=" ")
        except (ValueError, DeprecationWarning):
            vals = np.zeros(0, np.int64)
        if vals.size == 2 * lines:
            return vals[0::2].copy(), vals[1::2].copy()
    a = np.frombuffer(data, dtype=np.uint8)
    tok = _IDX_TOKEN[a]
    bad = ~(tok | _IDX_SPACE[a])
    if bad.any():
        raise _idx_line_error(idx_path, data, int(np.argmax(bad)), base_line,
                              "binary or non-numeric data where a 'key<TAB>offset' line was expected")
    starts = np.flatnonzero(tok & ~np.concatenate(([False], tok[:-1])))
    newlines = np.flatnonzero(a == 0x0A)
    line_of = np.searchsorted(newlines, starts)
    per_line = np.bincount(line_of, minlength=len(newlines) + 1)
    wrong = np.flatnonzero((per_line != 0) & (per_line != 2))
    if wrong.size:
        ln = int(wrong[0])
        pos = int(newlines[ln - 1]) + 1 if ln > 0 else 0
        raise _idx_line_error(idx_path, data, pos, base_line, "expected 'key<TAB>offset'")
    if starts.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a token fromstring cannot read must not end the parse quietly
        try:
            vals = np.fromstring(data, dtype=np.int64, sep=" ")  # C speed; any whitespace separates
        except (ValueError, DeprecationWarning):
            vals = np.zeros(0, np.int64)
    if vals.size != starts.size:
        # A token such as "12-3" or "--": find its line for the message.
        for j, s in enumerate(starts):
            e = s
            while e < len(a) and tok[e]:
                e += 1
            try:
                int(data[s:e])
            except ValueError:
                raise _idx_line_error(idx_path, data, int(s), base_line,
                                      "key and offset must be integers") from None
        raise RecordIOError(f"{idx_path}: could not parse lines {base_line}.. (internal mismatch)")
    return vals[0::2].copy(), vals[1::2].copy()


def read_index(idx_path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Reads a ``.idx`` text index, vectorised (no per-line Python loop).

    Args:
        idx_path: Path of the index file.

    Returns:
        ``(keys [R] int64, offsets [R] int64)`` in file order.

    Raises:
        RecordIOError: A line is not ``key<whitespace>offset`` with integers, or
            holds binary data; the message names the file and the line number.
    """
    keys: list[np.ndarray] = []
    offsets: list[np.ndarray] = []
    line = 1
    rest = b""
    with open(idx_path, "rb") as f:
        while True:
            block = f.read(_IDX_CHUNK)
            data = rest + block
            if not block:
                rest = b""
            else:
                cut = data.rfind(b"\n") + 1  # parse whole lines; carry the partial last one
                if cut == 0:
                    rest = data
                    continue
                data, rest = data[:cut], data[cut:]
            if data and not data.endswith(b"\n"):
                data += b"\n"
            if data:
                k, o = _parse_index_chunk(idx_path, data, line)
                keys.append(k)
                offsets.append(o)
                line += data.count(b"\n")
            if not block:
                break
    if not keys:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(keys), np.concatenate(offsets)


_POW10 = 10 ** np.arange(19, dtype=np.uint64)


def _digits(v: np.ndarray) -> np.ndarray:
    """``[N, W]`` ASCII digits of non-negative ``v`` (right-aligned, 0 bytes before the number)."""
    v = v.astype(np.uint64)
    width = max(1, len(str(int(v.max())))) if len(v) else 1
    pw = _POW10[:width][::-1]
    d = ((v[:, None] // pw[None, :]) % np.uint64(10)).astype(np.uint8) + np.uint8(48)
    lead = v[:, None] < pw[None, :]
    lead[:, -1] = False  # the number 0 still has one digit
    d[lead] = 0
    return d


def format_index_lines(keys: np.ndarray, offsets: np.ndarray) -> bytes:
    """``key<TAB>offset<LF>`` lines for non-negative integer arrays, vectorised."""
    k = np.asarray(keys, dtype=np.int64)
    o = np.asarray(offsets, dtype=np.int64)
    if len(k) == 0:
        return b""
    if (k < 0).any() or (o < 0).any():
        return "".join(f"{int(a)}\t{int(b)}\n" for a, b in zip(k, o)).encode("ascii")
    n = len(k)
    m = np.concatenate([_digits(k), np.full((n, 1), 9, np.uint8), _digits(o), np.full((n, 1), 10, np.uint8)],
                       axis=1)
    return m[m != 0].tobytes()  # row-major: each line's bytes in order, padding dropped


def write_index(
    idx_path: str | os.PathLike[str], keys: Sequence[int] | np.ndarray, offsets: Sequence[int] | np.ndarray
) -> None:
    """Writes a ``.idx`` text index (``key<TAB>offset`` per line), atomically, vectorised."""
    tmp = Path(str(idx_path) + ".tmp")
    k = np.asarray(keys, dtype=np.int64)
    o = np.asarray(offsets, dtype=np.int64)
    with open(tmp, "wb") as f:
        for lo in range(0, len(k), 1 << 20):
            f.write(format_index_lines(k[lo : lo + (1 << 20)], o[lo : lo + (1 << 20)]))
    os.replace(tmp, idx_path)


# ----------------------------------------------------------------------------- writer


class RecordWriter:
    """Appends records to a ``.rec`` file and (optionally) writes its ``.idx``.

    Use as a context manager. Keys are integers; the index is written on close.

    Args:
        rec_path: Output ``.rec`` path (created or truncated).
        idx_path: Output ``.idx`` path, or None for an index-less file.
    """

    def __init__(self, rec_path: str | os.PathLike[str], idx_path: str | os.PathLike[str] | None = None):
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path is not None else None
        self._f: BinaryIO = open(self.rec_path, "wb")
        self._keys: list[int] = []
        self._offsets: list[int] = []
        self._sizes: dict[int, int] = {}

    def write(self, key: int, payload: bytes | memoryview) -> int:
        """Appends one record; returns its byte offset."""
        offset = self._f.tell()
        framed = frame_record(payload)
        self._f.write(framed)
        self._sizes[offset] = len(framed)
        self._keys.append(int(key))
        self._offsets.append(offset)
        return offset

    def write_image(self, key: int, label: float | Sequence[float] | np.ndarray, image: bytes,
                    id2: int = 0) -> int:
        """Appends an image record (``IRHeader`` with ``id = key``); returns its offset."""
        return self.write(key, pack_image_record(label, image, id=key, id2=id2))

    def tell(self) -> int:
        """Current end-of-file offset."""
        return self._f.tell()

    def overwrite(self, offset: int, payload: bytes) -> None:
        """Rewrites the record written at ``offset``; the new framing must have the same size.

        Used to fill in a header record whose contents are known only at the end.
        """
        framed = frame_record(payload)
        if self._sizes.get(offset) != len(framed):
            raise ValueError(
                f"overwrite() at offset {offset}: new record is {len(framed)} bytes framed, the old "
                f"one {self._sizes.get(offset)}; only same-size rewrites of written records work"
            )
        here = self._f.tell()
        self._f.seek(offset)
        self._f.write(framed)
        self._f.seek(here)

    def close(self) -> None:
        """Flushes the ``.rec`` and writes the ``.idx``."""
        if self._f.closed:
            return
        self._f.close()
        if self.idx_path is not None:
            write_index(self.idx_path, self._keys, self._offsets)

    def abort(self) -> None:
        """Closes and deletes the partial ``.rec``; writes no ``.idx`` (nothing looks complete)."""
        if not self._f.closed:
            self._f.close()
        try:
            os.unlink(self.rec_path)
        except FileNotFoundError:
            pass

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        # An exception (or Ctrl-C) mid-write must not leave a valid-looking shorter file.
        if exc_type is not None:
            self.abort()
        else:
            self.close()


# ----------------------------------------------------------------------------- reader


def scan_offsets(buf: mmap.mmap | bytes, path: str = "<buffer>") -> np.ndarray:
    """Finds every record start by walking the framing from offset 0.

    Args:
        buf: The whole ``.rec`` contents.
        path: File name used in error messages.

    Returns:
        ``[R] int64`` record offsets.
    """
    offsets: list[int] = []
    pos = 0
    size = len(buf)
    while pos < size:
        offsets.append(pos)
        _, pos = _read_framed(buf, pos, path)
    return np.asarray(offsets, dtype=np.int64)


class RecordReader:
    """Random access to a ``.rec`` file through a memory map.

    With an index, records are addressed by key; without one, the file is scanned
    once and keys are the record ordinals 0..R-1.

    Args:
        rec_path: The ``.rec`` file.
        idx_path: Its ``.idx``; None means ``rec_path`` with ``.idx`` suffix when
            that exists, else scan. Pass ``False`` to force a scan.

    Raises:
        RecordIOError: The index points beyond the end of the file, or the file
            is empty/malformed where scanned.
    """

    def __init__(self, rec_path: str | os.PathLike[str], idx_path: str | os.PathLike[str] | None | bool = None):
        self.rec_path = str(rec_path)
        self._file = open(self.rec_path, "rb")
        self.size = os.fstat(self._file.fileno()).st_size
        self._mm: mmap.mmap | bytes
        self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if self.size else b""
        if idx_path is None or idx_path is True:
            guess = Path(self.rec_path).with_suffix(".idx")
            idx_path = guess if guess.exists() else False
        if idx_path is False:
            self.idx_path = None
            self.offsets = scan_offsets(self._mm, self.rec_path)
            self.keys = np.arange(len(self.offsets), dtype=np.int64)
        else:
            self.idx_path = str(idx_path)
            self.keys, self.offsets = read_index(idx_path)
            self._check_offsets()
        self._order: np.ndarray | None = None
        self._sorted_keys: np.ndarray | None = None

    def _key_order(self) -> tuple[np.ndarray, np.ndarray]:
        # Sorted keys + searchsorted instead of a dict: a dict of millions of
        # Python ints costs ~100 bytes per record in every worker process. Built
        # on first lookup only: reading a plain file in order never needs it.
        if self._order is None or self._sorted_keys is None:
            if len(self.keys) > 1 and bool((self.keys[1:] > self.keys[:-1]).all()):
                self._order = np.arange(len(self.keys), dtype=np.int64)
            else:
                self._order = np.argsort(self.keys, kind="stable")
            self._sorted_keys = self.keys[self._order]
        return self._order, self._sorted_keys

    def positions(self, keys: np.ndarray | Sequence[int]) -> np.ndarray:
        """Index positions of ``keys`` (``[K] int64``), -1 where a key is absent."""
        k = np.asarray(keys, dtype=np.int64)
        order, sorted_keys = self._key_order()
        if len(sorted_keys) == 0:
            return np.full(k.shape, -1, dtype=np.int64)
        j = np.searchsorted(sorted_keys, k)
        j = np.minimum(j, len(sorted_keys) - 1)
        found = sorted_keys[j] == k
        return np.where(found, order[j], -1).astype(np.int64)

    def has_key(self, key: int) -> bool:
        """Whether the index has ``key``."""
        return bool(self.positions([key])[0] >= 0)

    def _pos_of(self, key: int) -> int | None:
        i = int(self.positions([key])[0])
        return None if i < 0 else i

    def _check_offsets(self) -> None:
        if len(self.offsets) == 0:
            return
        bad = np.nonzero((self.offsets < 0) | (self.offsets + 8 > self.size))[0]
        if bad.size:
            i = int(bad[0])
            raise RecordIOError(
                f"{self.idx_path}: key {int(self.keys[i])} has offset {int(self.offsets[i])} "
                f"beyond the end of {self.rec_path} ({self.size} bytes); the index does not "
                "belong to this file or the file is truncated"
            )

    def __len__(self) -> int:
        return len(self.offsets)

    @property
    def buffer(self) -> mmap.mmap | bytes:
        """The memory-mapped file contents."""
        return self._mm

    def read_at(self, offset: int) -> bytes:
        """Returns the payload of the record starting at byte ``offset``."""
        return _read_framed(self._mm, int(offset), self.rec_path)[0]

    def read(self, key: int) -> bytes:
        """Returns the payload of the record with index key ``key``."""
        i = self._pos_of(key)
        if i is None:
            raise KeyError(f"{self.rec_path}: no record with key {key}")
        return self.read_at(int(self.offsets[i]))

    def read_image(self, key: int) -> ImageRecord:
        """Reads and parses the image record with key ``key``."""
        i = self._pos_of(key)
        if i is None:
            raise KeyError(f"{self.rec_path}: no record with key {key}")
        off = int(self.offsets[i])
        return unpack_image_record(self.read_at(off), f"{self.rec_path} at offset {off}")

    def offset_of(self, key: int) -> int:
        """Byte offset of the record with key ``key``."""
        i = self._pos_of(key)
        if i is None:
            raise KeyError(f"{self.rec_path}: no record with key {key}")
        return int(self.offsets[i])

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        for k, off in zip(self.keys, self.offsets):
            yield int(k), self.read_at(int(off))

    def close(self) -> None:
        """Releases the memory map and file handle."""
        if isinstance(self._mm, mmap.mmap) and not self._mm.closed:
            try:
                self._mm.close()
            except BufferError:
                pass  # numpy views still alive; the map goes when they do
        self._file.close()

    def __del__(self) -> None:
        if hasattr(self, "_file"):
            self.close()

    def __enter__(self) -> RecordReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # The mmap cannot be pickled; DataLoader workers reopen the file instead.
    def __getstate__(self) -> dict[str, object]:
        return {"rec_path": self.rec_path, "idx_path": self.idx_path}

    def __setstate__(self, state: dict[str, object]) -> None:
        idx = state["idx_path"]
        self.__init__(state["rec_path"], idx if idx is not None else False)  # type: ignore[misc]

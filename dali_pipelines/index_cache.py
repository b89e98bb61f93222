"""Binary index cache of a face dataset: flat ``.npy`` arrays every rank memory-maps.

Opening a RecordIO dataset means knowing, per image record, its byte offset,
the byte range of its JPEG and its label. Parsing that from the text ``.idx``
and the record headers takes tens of seconds at WebFace42M scale (42.5M
records), and keeping it in per-process numpy arrays costs every rank of a
node its own copy. This module stores those arrays once, as plain ``.npy``
files, and opens them with ``np.load(mmap_mode="r")``: the ranks of a node then
share one copy in the page cache and a warm open reads only a small JSON file.

Layout of one cache entry (a directory)::

    <base>/<dataset file name>-<key>/meta.json    format version, fingerprint, counts, layout
    <base>/<dataset file name>-<key>/<array>.npy  one flat array each (see ``open_index``)

``key`` hashes the format version, the layout argument and every data file's
absolute path, size, modification and change time (ns), inode number and a
hash of its first and last 64 KiB, so a changed ``.rec`` or ``.idx`` is not
served from a stale entry (a same-size, same-inode rewrite inside one
timestamp tick that leaves both ends intact is the one change it cannot see). ``base`` is, in order of
preference, an explicit ``cache_dir``, ``<data dir>/.pfc-index`` and
``$PFC_INDEX_CACHE`` (default ``~/.cache/partial-fc/index``).

Concurrency: builders serialise on an ``fcntl.flock`` lock file; the first
builds into a private temporary directory and renames it into place (atomic),
the others wait on the lock and then find the finished entry. A builder that
cannot lock (e.g. a file system without flock) still builds into its own
temporary directory; the rename makes one winner and the losers discard theirs.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: Bump when the arrays or their meaning change; older entries are ignored.
INDEX_VERSION = 1


@dataclass(frozen=True)
class Source:
    """One RecordIO file of a dataset: the ``.rec`` and its ``.idx`` (None: scan the file)."""

    rec: str
    idx: str | None


_ENDS = 1 << 16


def _ends_digest(path: str, size: int) -> str:
    """Hash of the first and last 64 KiB: catches a same-size rewrite within one timestamp tick."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        h.update(f.read(_ENDS))
        if size > _ENDS:
            f.seek(max(_ENDS, size - _ENDS))
            h.update(f.read(_ENDS))
    return h.hexdigest()[:16]


def fingerprint(sources: Sequence[Source], layout: str) -> dict[str, Any]:
    """What a cache entry must match: format version, layout and each file's path, size, mtime."""
    files = []
    for s in sources:
        for p in (s.rec, s.idx):
            if p is None:
                files.append(None)
                continue
            st = os.stat(p)
            files.append([os.path.abspath(p), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino,
                          _ends_digest(p, st.st_size)])
    return {"version": INDEX_VERSION, "layout": layout, "files": files}


def _key(fp: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


def _bases(sources: Sequence[Source], cache_dir: str | os.PathLike[str] | None) -> list[Path]:
    if cache_dir is not None:
        return [Path(cache_dir)]
    home = os.environ.get("PFC_INDEX_CACHE") or str(Path.home() / ".cache" / "partial-fc" / "index")
    return [Path(sources[0].rec).resolve().parent / ".pfc-index", Path(home)]


def _load_entry(path: Path, fp: dict[str, Any]) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
    """Opens a finished entry (arrays memory-mapped), or None if absent or not matching ``fp``."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("fingerprint") != fp:
        return None
    try:
        arrays = {name: np.load(path / f"{name}.npy", mmap_mode="r", allow_pickle=False)
                  for name in meta["arrays"]}
    except (OSError, ValueError):
        return None
    return meta, arrays


def write_entry(path: Path, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> bool:
    """Writes an entry atomically (private temp dir, then rename); False if another won the race.

    Raises:
        OSError: The parent directory is not writable.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        for name, a in arrays.items():
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(a), allow_pickle=False)
        meta = dict(meta, arrays=sorted(arrays))
        (tmp / "meta.json").write_text(json.dumps(meta, sort_keys=True))
        try:
            os.rename(tmp, path)  # atomic; fails if the target exists (another builder won)
        except OSError as e:
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                return False
            raise
        return True
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _cleanup_stale(path: Path) -> None:
    """Removes other entries of the same dataset file name (older data), best effort."""
    stem = path.name.rsplit("-", 1)[0]
    for p in path.parent.glob(f"{stem}-*"):
        if p != path and p.is_dir() and len(p.name) == len(path.name):
            shutil.rmtree(p, ignore_errors=True)
    for p in path.parent.glob(f".{stem}-*.lock"):
        if p.name != f".{path.name}.lock" and len(p.name) == len(path.name) + 6:
            try:
                p.unlink()
            except OSError:
                pass


def entry_path(sources: Sequence[Source], layout: str, name: str,
               cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the entry of ``sources`` goes in the first writable base (for writers such as pack)."""
    fp = fingerprint(sources, layout)
    return _bases(sources, cache_dir)[0] / f"{name}-{_key(fp)}"


def open_index(
    sources: Sequence[Source],
    layout: str,
    name: str,
    build: Callable[[], tuple[dict[str, Any], dict[str, np.ndarray]]],
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray], Path | None]:
    """Opens the cached index of ``sources``, building it (once, under a lock) if needed.

    Args:
        sources: The dataset's files.
        layout: Layout argument (part of the key).
        name: Dataset file name (``train.rec``, ``train.json``) used in the entry's directory name.
        build: Returns ``(meta, arrays)`` from the data files (the slow path).
        cache_dir: Explicit cache directory (else next to the data, then the user cache).

    Returns:
        ``(meta, arrays, entry directory)``. Arrays are read-only memory maps; if
        no directory is writable, the built in-memory arrays and None.
    """
    fp = fingerprint(sources, layout)
    key = _key(fp)
    bases = _bases(sources, cache_dir)
    for base in bases:
        hit = _load_entry(base / f"{name}-{key}", fp)
        if hit is not None:
            return hit[0], hit[1], base / f"{name}-{key}"
    built: tuple[dict[str, Any], dict[str, np.ndarray]] | None = None
    for base in bases:
        path = base / f"{name}-{key}"
        try:
            base.mkdir(parents=True, exist_ok=True)
            lock = open(base / f".{name}-{key}.lock", "a+b")
        except OSError:
            continue  # read-only: try the next base
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX)  # the others wait here while one builds
            except OSError:
                pass  # no flock on this file system: build-own-and-rename still keeps it valid
            hit = _load_entry(path, fp)
            if hit is None:
                if built is None:  # built once, even if the first base turns out not writable
                    built = build()
                meta, arrays = dict(built[0], fingerprint=fp), built[1]
                try:
                    won = write_entry(path, meta, arrays)
                except OSError:
                    continue
                if won:
                    _cleanup_stale(path)
                hit = _load_entry(path, fp)
                if hit is None:  # e.g. the files changed while we built: use what we built
                    return meta, arrays, None
            return hit[0], hit[1], path
        finally:
            lock.close()
    meta, arrays = built if built is not None else build()
    return dict(meta, fingerprint=fp), arrays, None


def load_entry(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Re-opens a known entry (e.g. after unpickling a dataset in a worker process)."""
    meta = json.loads((Path(path) / "meta.json").read_text())
    return meta, {n: np.load(Path(path) / f"{n}.npy", mmap_mode="r", allow_pickle=False)
                  for n in meta["arrays"]}

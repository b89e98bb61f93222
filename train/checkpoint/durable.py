"""Durable writes: fsync of files and directories, atomic replacement, a full disk named.

A checkpoint's commit relies on these: a file is on disk (fsynced) before it is listed in a
manifest, a small text file (``latest``, a report) is replaced atomically (write, fsync, rename),
and a directory's entries are fsynced after a rename. A write that fails because the disk (or the
quota) is full raises ``OSError(ENOSPC, "no space left on device: PATH")`` naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
from pathlib import Path
from typing import Any

from .format import _TMP_MARK


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _disk_full(e: BaseException) -> bool:
    """Whether ``e`` or an exception it was raised from is ENOSPC/EDQUOT.

    torch.save reports a failed write as ``RuntimeError: ... unexpected pos A vs B``, with the
    ``OSError`` of the write only in ``__context__``.
    """
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e = e.__cause__ or e.__context__
    return False


@contextlib.contextmanager
def _name_disk_full(path: Path):
    """Turns any failure caused by a full disk (or quota) into ``no space left on device: PATH``."""
    try:
        yield
    except Exception as e:
        if _disk_full(e):
            raise OSError(errno.ENOSPC, f"no space left on device: {path}") from e
        raise


def _write_text_atomic(path: Path, text: str) -> None:
    """Replaces ``path`` with ``text`` atomically (temporary file, fsync, rename, fsync the directory)."""
    tmp = path.with_name(f"{path.name}{_TMP_MARK}{secrets.token_hex(4)}")
    with _name_disk_full(tmp), open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _write_json_atomic(path: Path, obj: Any) -> None:
    """Replaces ``path`` with ``obj`` as JSON via ``path.partial`` (fsync, rename)."""
    tmp = path.with_name(path.name + ".partial")
    with _name_disk_full(tmp), open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)

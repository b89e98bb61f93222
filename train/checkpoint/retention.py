"""Which checkpoints are kept: ``keep_last`` verified ones, and the run's ``best`` one.

* :func:`_prune` (rank 0, after each commit) keeps the newest ``keep_last`` checkpoints that are
  verified good (complete, finite, sha256 intact) and deletes older ones and stale ``.tmp-``
  directories; a damaged checkpoint never takes the place of a good one.
* :func:`keep_as_best` makes a committed checkpoint ``<root>/best`` (hard links, atomic swap) for
  ``checkpoint.keep_best``; :func:`read_best` reads its record.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from pathlib import Path
from typing import Optional

from .durable import _fsync_dir, _write_text_atomic
from .format import _TMP_MARK
from .reader import _HASH_VERIFIED, _step_dirs, _verified_good, read_manifest

log = logging.getLogger(__name__)

BEST = "best"
BEST_RECORD = "best.json"


def _prune(root: Path, keep_last: Optional[int], keep: Path) -> None:
    """Keeps the newest ``keep_last`` verified checkpoints; deletes older ones and stale ``.tmp-`` dirs.

    Only verified checkpoints count (complete, not recorded as non-finite, sha256 intact; see
    :func:`_verified_good`): a damaged one never takes the place of a good one, so the newest
    good checkpoint always survives. ``keep`` (the checkpoint just written and hashed) counts as
    verified. Damaged directories newer than the oldest kept one are left alone (with a
    warning) for inspection; older ones go with the rest.
    """
    for p in root.iterdir():
        if (_TMP_MARK in p.name or ".replaced-" in p.name) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
    if keep_last is None:
        return
    kept = 0
    for _, path in reversed(_step_dirs(root)):
        if kept < keep_last:
            if path == keep or _verified_good(path):
                kept += 1
            else:
                log.warning("retention: %s is damaged or incomplete; it is not counted as one of the "
                            "keep_last=%d checkpoints", path, keep_last)
        elif path != keep:
            _HASH_VERIFIED.pop(str(path), None)
            shutil.rmtree(path, ignore_errors=True)


def keep_as_best(path: Path, ckpt_root: Path, record: dict) -> Path:
    """Makes the committed checkpoint ``path`` the run's best: ``<ckpt_root>/best`` (rank 0 only).

    The files are hard-linked (copied where the file system has no hard links), so ``best`` costs
    no space while ``path`` itself is kept, and survives when retention deletes ``path``. The swap
    is atomic (the old ``best`` is renamed aside, the new one renamed into place, then the old one
    deleted); ``best/best.json`` records the figure, its value and the step.
    """
    read_manifest(path)  # a committed checkpoint only
    root = Path(ckpt_root)
    tmp = root / f"{BEST}{_TMP_MARK}{secrets.token_hex(4)}"
    tmp.mkdir()
    for f in path.iterdir():
        if f.is_file():
            try:
                os.link(f, tmp / f.name)
            except OSError:
                shutil.copy2(f, tmp / f.name)
    _write_text_atomic(tmp / BEST_RECORD, json.dumps(record, indent=1) + "\n")
    _fsync_dir(tmp)
    best = root / BEST
    aside = None
    if best.exists():
        aside = root / f"{BEST}.replaced-{secrets.token_hex(4)}"
        os.replace(best, aside)
    os.replace(tmp, best)
    _fsync_dir(root)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return best


def read_best(ckpt_root: Path) -> Optional[dict]:
    """The record of ``<ckpt_root>/best`` (``None`` when there is none or it is unreadable)."""
    try:
        rec = json.loads((Path(ckpt_root) / BEST / BEST_RECORD).read_text())
        return rec if isinstance(rec, dict) and "value" in rec else None
    except (OSError, ValueError):
        return None

"""The on-disk format of a checkpoint: names, format version, manifest schema, safe files.

Everything here is shared by the writers and the readers and fixes what is on disk (changing a
name or the manifest's entries changes the format, ``FORMAT_VERSION``):

* file and directory names (:func:`step_dir_name`, :func:`shard_file_name`, :func:`rng_file_name`);
* the manifest schema (:func:`make_manifest`, the entries :func:`train.checkpoint.read_manifest`
  requires);
* sha256 hashing of the files (:func:`_sha256`) and their check against the manifest
  (:func:`_check_files`);
* safety: what may be saved (:func:`_check_safe`: only what ``torch.load(weights_only=True)``
  accepts) and the only way a file is loaded (:func:`_load`: size/sha256 first, then
  ``weights_only=True``).
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional, Union

import torch


FORMAT = "partial-fc-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LATEST = "latest"
BACKBONE_FILE = "backbone.pt"
REPLICATED_FILE = "head_replicated.pt"
_STEP_RE = re.compile(r"^step_(\d+)$")
_TMP_MARK = ".tmp-"
_CHUNK = 1 << 20
_MANIFEST_KEYS = ("step", "world_size", "num_classes", "embedding_size", "shards", "rng_files", "files")

PathLike = Union[str, os.PathLike]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupted, unsafe, or does not fit the model."""


# --------------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------------
def step_dir_name(step: int) -> str:
    """``step_000001234`` for step 1234."""
    return f"step_{int(step):09d}"


def shard_file_name(start: int, end: int) -> str:
    """``head_classes_{start:09d}_{end:09d}.pt`` for classes ``[start, end)``."""
    return f"head_classes_{start:09d}_{end:09d}.pt"


def rng_file_name(rank: int) -> str:
    """``rng_rank{rank}.pt``: the RNG states of one process."""
    return f"rng_rank{rank}.pt"


def _format_exc(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


# --------------------------------------------------------------------------------------------------
# Manifest schema
# --------------------------------------------------------------------------------------------------
def make_manifest(step: int, head_config, world_size: int, reports: list[dict], all_files: dict,
                  finite: Optional[bool] = None) -> dict:
    """The ``manifest.json`` of a checkpoint (format version ``FORMAT_VERSION``).

    Args:
        reports: One ``{"files": ..., "range": [start, end]}`` per rank, in rank order.
        all_files: ``{file name: {"size", "sha256"}}`` of every file of the checkpoint.
        finite: When given, recorded as ``"finite"`` with ``"verified_step"``.
    """
    cfg = head_config
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "step": int(step),
        "world_size": world_size,
        "num_classes": int(cfg.num_classes),
        "embedding_size": int(cfg.embedding_size),
        "method": getattr(cfg, "method", None),
        "created_unix": time.time(),
        "torch_version": torch.__version__,
        "shards": [{"file": shard_file_name(*rep["range"]), "start": rep["range"][0], "end": rep["range"][1]}
                   for rep in reports],
        "rng_files": [rng_file_name(r) for r in range(world_size)],
        "files": dict(sorted(all_files.items())),
    }
    if finite is not None:
        # The trainer checked every tensor of this state (all ranks) just before the save.
        manifest["finite"] = bool(finite)
        manifest["verified_step"] = int(step)
    return manifest


# --------------------------------------------------------------------------------------------------
# Hashing and checking files against the manifest
# --------------------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _check_files(path: Path, manifest: dict, names, hashes: bool) -> None:
    """Each file of ``names`` is listed, present, of its recorded size and (``hashes``) sha256."""
    for name in names:
        rec = manifest["files"].get(name)
        if rec is None:
            raise CheckpointError(f"{path / MANIFEST} does not list {name}")
        fp = path / name
        if not fp.is_file():
            raise CheckpointError(f"checkpoint file {fp} is missing")
        size = fp.stat().st_size
        if size != rec["size"]:
            raise CheckpointError(
                f"checkpoint file {fp} has {size} bytes, the manifest says {rec['size']}: truncated or corrupted"
            )
        if hashes and _sha256(fp) != rec["sha256"]:
            raise CheckpointError(f"checkpoint file {fp} fails its sha256 integrity check: corrupted")


def _load(path: Path, manifest: dict, name: str, verify: bool, mmap: bool = True) -> Any:
    """Loads one file of a checkpoint: checked against the manifest, then ``weights_only=True``."""
    _check_files(path, manifest, [name], hashes=verify)
    try:
        return torch.load(path / name, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - UnpicklingError, RuntimeError for bad zips, ...
        raise CheckpointError(
            f"refused to load {path / name} with weights_only=True ({type(e).__name__}: {e}); "
            "the file is corrupted or not a partial-fc checkpoint file (it may contain code)"
        ) from e


# --------------------------------------------------------------------------------------------------
# weights_only compatibility of what we save
# --------------------------------------------------------------------------------------------------
_PRIMITIVES = (int, float, bool, str, type(None))


def _check_safe(obj: Any, where: str) -> None:
    """Raises ``TypeError`` if ``obj`` holds anything ``torch.load(weights_only=True)`` would refuse."""
    if isinstance(obj, torch.Tensor) or type(obj) in _PRIMITIVES:
        return
    if type(obj) in (dict, OrderedDict):
        for k, v in obj.items():
            if type(k) not in _PRIMITIVES:
                raise TypeError(f"{where}: key {k!r} of type {type(k).__name__} cannot be saved safely")
            _check_safe(v, f"{where}[{k!r}]")
        return
    if type(obj) in (list, tuple):
        for i, v in enumerate(obj):
            _check_safe(v, f"{where}[{i}]")
        return
    raise TypeError(
        f"{where} is a {type(obj).__module__}.{type(obj).__name__}; checkpoints hold only tensors, "
        "numbers, strings, None and dict/list/tuple of those (weights_only loading)"
    )


def _to_cpu(obj: Any) -> Any:
    """A copy of ``obj`` with its tensors on the CPU (host tensors are shared, not cloned)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        out = type(obj)((k, _to_cpu(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):  # state_dict versions (BatchNorm & co. read them on load)
            out._metadata = obj._metadata
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj

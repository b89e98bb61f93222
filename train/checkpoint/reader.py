"""Reading checkpoints: the manifest, finding the newest complete one, checking and loading.

* :func:`read_manifest` validates ``manifest.json`` (format, version, entries);
* :func:`find_latest` / :func:`list_checkpoints` find checkpoints under a root (the trainer tries
  them newest first and falls back to the newest one :func:`check_checkpoint` accepts);
* :func:`_verified_good` (every file matches its sha256, cached per process in ``_HASH_VERIFIED``)
  is what retention counts;
* :func:`check_checkpoint` checks, changing nothing, that :func:`load_checkpoint` would succeed;
  :func:`load_checkpoint` restores a checkpoint written on any world size (resharding of the head:
  ``reshard.py``).
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from partial_fc.distributed import ParallelContext
from partial_fc.sharding import step_seed

from .collectives import _raise_if_any_failed
from .format import (BACKBONE_FILE, FORMAT, FORMAT_VERSION, MANIFEST, REPLICATED_FILE, _MANIFEST_KEYS, _STEP_RE,
                     _TMP_MARK, CheckpointError, PathLike, _check_files, _format_exc, _load, rng_file_name)
from .reshard import _check_optimizer_fits, _load_head_shards, _load_optimizer
from .rng import _reseed, _set_rng_state
from .state import _split_head_state, _strip_module_prefix, _unwrap

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------------
def read_manifest(path: PathLike) -> dict:
    """Reads and validates ``manifest.json`` of a checkpoint directory.

    Args:
        path: A ``step_*`` checkpoint directory.

    Returns:
        The manifest dict.

    Raises:
        CheckpointError: Missing or unparsable manifest, or a format/version this code cannot read.
    """
    path = Path(path)
    mpath = path / MANIFEST
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint directory (it does not exist)")
    if not mpath.is_file():
        raise CheckpointError(
            f"{path} has no {MANIFEST}: the save that wrote it did not complete (crashed or still running)"
        )
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{mpath} is not valid JSON ({e}); the checkpoint is damaged") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{mpath} is not a partial-fc checkpoint manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{mpath} has format version {version!r}; this code reads version {FORMAT_VERSION} only "
            "(a newer partial-fc wrote it? upgrade)"
        )
    missing = [k for k in _MANIFEST_KEYS if k not in manifest]
    if missing:
        raise CheckpointError(f"{mpath} lacks the entries {missing}; the checkpoint is damaged")
    return manifest


def _check_complete(path: Path) -> dict:
    """Manifest valid, every listed file present with its recorded size (cheap: no hashing)."""
    manifest = read_manifest(path)
    _check_files(path, manifest, manifest["files"], hashes=False)
    return manifest


def _validate_manifest(path: Path, manifest: dict, head: nn.Module) -> None:
    """The checkpoint fits the head: ``num_classes``, ``embedding_size``, shard ranges tile the classes."""
    cfg = head.config
    if manifest["num_classes"] != cfg.num_classes:
        raise CheckpointError(
            f"{path} was saved with num_classes={manifest['num_classes']}, the head has {cfg.num_classes}"
        )
    if manifest["embedding_size"] != cfg.embedding_size:
        raise CheckpointError(
            f"{path} was saved with embedding_size={manifest['embedding_size']}, the head has {cfg.embedding_size}"
        )
    pos = 0
    for shard in manifest["shards"]:
        if shard["start"] != pos or shard["end"] <= shard["start"]:
            raise CheckpointError(f"{path / MANIFEST}: shard ranges do not tile [0, num_classes)")
        pos = shard["end"]
    if pos != cfg.num_classes:
        raise CheckpointError(f"{path / MANIFEST}: shard ranges end at {pos}, not at num_classes={cfg.num_classes}")


# --------------------------------------------------------------------------------------------------
# Discovery and verification
# --------------------------------------------------------------------------------------------------
def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    out = []
    if root.is_dir():
        for p in root.iterdir():
            m = _STEP_RE.match(p.name)
            if m and p.is_dir():
                out.append((int(m.group(1)), p))
    return sorted(out)


def find_latest(ckpt_root: PathLike) -> Optional[Path]:
    """The newest complete checkpoint under ``ckpt_root``, or ``None``.

    Complete means: a ``step_*`` directory (never a ``.tmp-`` one) whose manifest parses, has the
    supported format version, and whose listed files all exist with their recorded sizes. Hashes are
    checked when loading, not here. Incomplete directories are skipped with a warning. The newest
    complete directory wins even if the ``latest`` pointer lags behind (the directory rename is the
    commit; the pointer is a convenience for shell tools).

    Args:
        ckpt_root: The directory :func:`save_checkpoint` writes into.

    Returns:
        Path of the checkpoint directory, or ``None`` when there is no complete one.
    """
    root = Path(ckpt_root)
    if not root.is_dir():
        return None
    for p in sorted(root.iterdir()):
        if _TMP_MARK in p.name and p.is_dir():
            warnings.warn(f"ignoring incomplete checkpoint {p} (an interrupted save)", stacklevel=2)
    for _, path in reversed(_step_dirs(root)):
        try:
            if _check_complete(path).get("finite") is False:
                raise CheckpointError("its manifest records non-finite values")
            return path
        except CheckpointError as e:
            warnings.warn(f"ignoring incomplete checkpoint {path}: {e}", stacklevel=2)
    return None


def list_checkpoints(ckpt_root: PathLike) -> list[Path]:
    """Every ``step_*`` directory under ``ckpt_root``, newest first, complete or not.

    For callers that try them in turn (the trainer's auto-resume falls back from a damaged
    newest checkpoint to the newest one :func:`check_checkpoint` accepts).
    """
    return [path for _, path in reversed(_step_dirs(Path(ckpt_root)))]


#: Checkpoints whose every file matched its sha256 in this process: {directory: manifest mtime}.
#: Retention re-hashes a checkpoint once per process, not at every save.
_HASH_VERIFIED: dict[str, int] = {}


def _verified_good(path: Path) -> bool:
    """Complete, not recorded as non-finite, and every file matches its sha256 (cached)."""
    try:
        manifest = _check_complete(path)
        if manifest.get("finite") is False:
            return False
        stamp = (path / MANIFEST).stat().st_mtime_ns
        if _HASH_VERIFIED.get(str(path)) != stamp:
            _check_files(path, manifest, manifest["files"], hashes=True)
            _HASH_VERIFIED[str(path)] = stamp
        return True
    except (CheckpointError, OSError):
        return False


# --------------------------------------------------------------------------------------------------
# Check and load
# --------------------------------------------------------------------------------------------------
def _replicated_matches(path: Path, manifest: dict, head: nn.Module, verify: bool) -> dict:
    """Loads ``head_replicated.pt``; its head state has the same entries as this head's."""
    rep = _load(path, manifest, REPLICATED_FILE, verify, mmap=False)
    _, replicated = _split_head_state(head)
    if set(rep["state"]) != set(replicated):
        raise CheckpointError(f"{path}: replicated head state {sorted(rep['state'])} does not match the "
                              f"head's {sorted(replicated)} (different method or temperature?)")
    return rep


def _check_backbone_fits(path: Path, manifest: dict, backbone: nn.Module) -> None:
    """The saved backbone state has this backbone's keys and shapes (read memory-mapped)."""
    bb = _load(path, manifest, BACKBONE_FILE, False, mmap=True)
    if bb["model"] is None:
        raise CheckpointError(f"{path} has no model state to load (it was saved without one)")
    saved = _strip_module_prefix(bb["model"])
    want = _unwrap(backbone).state_dict()
    missing, unexpected = sorted(set(want) - set(saved)), sorted(set(saved) - set(want))
    shapes = [k for k in want if k in saved and tuple(saved[k].shape) != tuple(want[k].shape)]
    if missing or unexpected or shapes:
        k = shapes[0] if shapes else None
        raise CheckpointError(
            f"{path} holds a different backbone: missing {missing[:3]}, unexpected {unexpected[:3]}"
            + (f", {k} has shape {tuple(saved[k].shape)} here {tuple(want[k].shape)}" if k else "")
        )


def _files_this_rank_reads(manifest: dict, head: nn.Module) -> list[str]:
    """The shard files overlapping this rank's classes, the replicated and backbone files, its RNG file."""
    ctx: ParallelContext = head.ctx
    lo, hi = head.class_start, head.class_start + head.num_local_classes
    names = [sh["file"] for sh in manifest["shards"] if max(lo, sh["start"]) < min(hi, sh["end"])]
    names += [REPLICATED_FILE, BACKBONE_FILE]
    if manifest["world_size"] == ctx.world_size:
        names.append(rng_file_name(ctx.rank))
    return names


def _check_locally(path: Path, head, head_optimizer, backbone, verify: bool) -> dict:
    """This rank's part of :func:`check_checkpoint`; returns the manifest."""
    manifest = read_manifest(path)
    if manifest.get("finite") is False:
        raise CheckpointError(f"{path}: its manifest records non-finite values; it cannot be resumed from")
    _check_files(path, manifest, manifest["files"], hashes=False)
    _validate_manifest(path, manifest, head)
    _check_files(path, manifest, _files_this_rank_reads(manifest, head), hashes=verify)
    rep = _replicated_matches(path, manifest, head, False)
    if head_optimizer is not None and rep["optimizer"] is not None:
        _check_optimizer_fits(path, head, head_optimizer, rep)
    if backbone is not None:
        _check_backbone_fits(path, manifest, backbone)
    return manifest


def check_checkpoint(
    path: PathLike,
    head: nn.Module,
    head_optimizer: Optional[torch.optim.Optimizer] = None,
    *,
    backbone: Optional[nn.Module] = None,
    verify: bool = True,
) -> dict:
    """Checks, changing nothing, that :func:`load_checkpoint` can restore ``path`` into this job.

    Collective. Every rank checks what it would read: the manifest (complete, supported
    version, not recorded as non-finite, ``num_classes``/``embedding_size`` of the head), the size
    and (``verify``) sha256 of the shard files overlapping its classes, of ``head_replicated.pt``,
    ``backbone.pt`` and its RNG file, that the replicated head state and head optimizer match,
    and that the backbone state has this backbone's keys and shapes (read memory-mapped). A
    caller can then load with ``verify=False`` (the files were just hashed), and write nothing
    anywhere before this has passed.

    Returns:
        The manifest.

    Raises:
        CheckpointError: The first problem found, on every rank together (naming the rank).
    """
    path = Path(path)
    ctx: ParallelContext = head.ctx
    err, manifest = None, {}
    try:
        manifest = _check_locally(path, head, head_optimizer, backbone, verify)
    except Exception as e:  # noqa: BLE001 - every rank raises together below
        if not ctx.is_distributed:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"{path}: {_format_exc(e)}") from e
        err = _format_exc(e)
    _raise_if_any_failed(err, ctx, f"checking checkpoint {path}")
    return manifest


def _load_head(path: Path, manifest: dict, head, head_optimizer, verify: bool) -> None:
    """Restores the head (this rank's rows, resharded) and its optimizer."""
    sharded_optim = _load_head_shards(path, manifest, head, verify)
    rep = _replicated_matches(path, manifest, head, verify)
    _, replicated = _split_head_state(head)
    with torch.no_grad():
        for key, target in replicated.items():
            target.copy_(rep["state"][key])
    if head_optimizer is not None:
        _load_optimizer(head, head_optimizer, rep, sharded_optim, path)


def _load_backbone(path: Path, manifest: dict, verify: bool, backbone, backbone_optimizer, lr_scheduler,
                   scaler) -> dict:
    """Restores the backbone, its optimizer, scheduler and scaler; returns the ``extra_state``."""
    # Not memory-mapped: optimizer state loaded from it is updated in place later.
    bb = _load(path, manifest, BACKBONE_FILE, verify, mmap=False)
    for obj, key in ((backbone, "model"), (backbone_optimizer, "optimizer"),
                     (lr_scheduler, "lr_scheduler"), (scaler, "scaler")):
        if obj is not None and bb[key] is None:
            if getattr(obj, "missing_ok", False):  # e.g. a ZeRO run saved before its state was kept
                warnings.warn(f"{path} holds no {key} state; it starts fresh", stacklevel=3)
                continue
            raise CheckpointError(f"{path} has no {key} state to load (it was saved without one)")
    if backbone is not None:
        _unwrap(backbone).load_state_dict(_strip_module_prefix(bb["model"]))
    if backbone_optimizer is not None and bb["optimizer"] is not None:
        backbone_optimizer.load_state_dict(bb["optimizer"])
    if lr_scheduler is not None:
        lr_scheduler.load_state_dict(bb["lr_scheduler"])
    if scaler is not None:
        scaler.load_state_dict(bb["scaler"])
    return bb["extra"]


def _restore_rng(path: Path, manifest: dict, head, verify: bool) -> None:
    """This rank's own RNG states on the same world size; a per-rank reseed on another one."""
    ctx: ParallelContext = head.ctx
    if manifest["world_size"] == ctx.world_size:
        _set_rng_state(_load(path, manifest, rng_file_name(ctx.rank), verify, mmap=False))
        return
    _reseed(step_seed(int(head.config.seed), int(manifest["step"]), ctx.rank))
    if ctx.rank == 0:
        log.info("checkpoint %s was saved on %d ranks, loading on %d: RNGs reseeded per rank",
                 path, manifest["world_size"], ctx.world_size)


def load_checkpoint(
    path: PathLike,
    head: nn.Module,
    head_optimizer: Optional[torch.optim.Optimizer],
    *,
    backbone: Optional[nn.Module] = None,
    backbone_optimizer: Optional[torch.optim.Optimizer] = None,
    lr_scheduler: Any = None,
    scaler: Any = None,
    restore_rng: bool = True,
    verify: bool = True,
) -> dict:
    """Restores a checkpoint written on any world size into this job. Collective.

    Each rank reads only the shard files that overlap its class range
    ``ClassPartition(num_classes, world_size).range(rank)``, memory-mapped, and copies the
    overlapping rows of W, the bank buffers and W's optimizer state. Replicated head state, the
    backbone, its optimizer, scheduler and scaler come from rank-independent files.

    RNG: on the world size the checkpoint was saved with, rank ``r`` gets back its own RNG states
    (python, numpy, torch CPU, CUDA). On any other world size every rank reseeds python/numpy/torch
    from ``step_seed(head.config.seed, step, rank)``, deterministic and distinct per rank.

    Args:
        path: A checkpoint directory (e.g. from :func:`find_latest`).
        head: The freshly built head of this job (same ``num_classes``, ``embedding_size``, method).
        head_optimizer: Optimizer over the head's parameters (same class and param groups, by name,
            as at save time), or ``None`` to skip optimizer state.
        backbone, backbone_optimizer, lr_scheduler, scaler: What to load into (bare or wrapped
            backbone), or ``None`` to skip.
        restore_rng: Whether to restore/reseed the RNGs as described above.
        verify: Check each file read against its sha256 before loading it.

    Returns:
        The ``extra_state`` dict given to :func:`save_checkpoint`.

    Raises:
        CheckpointError: Missing/incomplete/corrupted files, unknown format version, a
            ``num_classes``/``embedding_size``/state mismatch, or a file weights_only refuses;
            raised on every rank together.
    """
    path = Path(path)
    ctx: ParallelContext = head.ctx
    err, extra = None, {}
    try:
        manifest = read_manifest(path)
        _validate_manifest(path, manifest, head)
        _load_head(path, manifest, head, head_optimizer, verify)
        extra = _load_backbone(path, manifest, verify, backbone, backbone_optimizer, lr_scheduler, scaler)
        if restore_rng:
            _restore_rng(path, manifest, head, verify)
    except Exception as e:  # noqa: BLE001 - every rank raises together below
        err = _format_exc(e)
        if not ctx.is_distributed:
            raise
    _raise_if_any_failed(err, ctx, f"loading checkpoint {path}")
    return extra

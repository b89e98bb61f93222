"""Writing a checkpoint synchronously, and the commit protocol it shares with the async writer.

Save protocol (atomic; all ranks call :func:`save_checkpoint`):

1. rank 0 creates ``step_X.tmp-<nonce>/`` and every rank learns the nonce (:func:`_make_tmp_dir`);
2. every rank writes and fsyncs its files and hashes them (sha256);
3. the file records are all-gathered; rank 0 commits (:func:`_commit_dir`): it checks that it sees
   every file (shared file system), writes ``manifest.json`` LAST (fsync), renames the directory
   to ``step_X/`` (``os.replace``), fsyncs the root, atomically rewrites the ``latest`` pointer,
   then applies retention (``retention.py``);
4. the outcome is all-gathered so every rank returns (or raises) together.

A crash before the rename leaves only a ``.tmp-`` directory that ``find_latest`` ignores; the
previous checkpoint is untouched. A full disk raises ``no space left on device: PATH``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from partial_fc.distributed import ParallelContext

from .collectives import _all_gather_json, _raise_if_any_failed
from .durable import _fsync_dir, _name_disk_full, _write_text_atomic
from .format import (BACKBONE_FILE, LATEST, MANIFEST, REPLICATED_FILE, _TMP_MARK, CheckpointError, PathLike,
                     _check_safe, _format_exc, _sha256, make_manifest, rng_file_name, shard_file_name,
                     step_dir_name)
from .retention import _prune
from .rng import _rng_state
from .state import _backbone_payload, _replicated_payload, _shard_payload, _split_head_state


def _save_file(obj: Any, path: Path) -> dict:
    """``torch.save`` + fsync; returns ``{"size", "sha256"}`` of the bytes on disk."""
    with _name_disk_full(path):
        with open(path, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    return {"size": path.stat().st_size, "sha256": _sha256(path)}


def _make_tmp_dir(root: Path, final: Path, ctx: ParallelContext) -> tuple[Path, str]:
    """Rank 0 creates ``<final>.tmp-<nonce>/``; every rank returns ``(its path, the nonce)``. Collective."""
    nonce = secrets.token_hex(6) if ctx.rank == 0 else None
    err = None
    if ctx.rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            (root / f"{final.name}{_TMP_MARK}{nonce}").mkdir()
        except OSError as e:
            err = _format_exc(e)
    nonces = _all_gather_json({"nonce": nonce, "error": err}, ctx)
    if nonces[0]["error"]:
        raise CheckpointError(f"cannot create a checkpoint directory in {root}: {nonces[0]['error']}")
    nonce = nonces[0]["nonce"]
    return root / f"{final.name}{_TMP_MARK}{nonce}", nonce


# --------------------------------------------------------------------------------------------------
# Commit (rank 0)
# --------------------------------------------------------------------------------------------------
def _check_all_visible(root: Path, tmp: Path, reports: list[dict]) -> dict:
    """Every file every rank reports is in ``tmp`` with its size; returns ``{name: record}``."""
    all_files = {}
    for rep in reports:
        all_files.update(rep["files"])
    for name, rec in all_files.items():  # a rank writing to a disk rank 0 cannot see fails here
        p = tmp / name
        if not p.is_file() or p.stat().st_size != rec["size"]:
            raise CheckpointError(f"rank 0 cannot see {p} as written by its rank: is {root} shared?")
    return all_files


def _write_manifest(tmp: Path, manifest: dict) -> None:
    """``manifest.json``, the commit record, written last: fsync, rename, fsync the directory."""
    mtmp = tmp / f"{MANIFEST}.partial"
    with _name_disk_full(mtmp), open(mtmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(mtmp, tmp / MANIFEST)
    _fsync_dir(tmp)


def _publish(root: Path, tmp: Path, final: Path, nonce: str) -> None:
    """Renames ``tmp`` to ``final`` (the commit), then points ``latest`` at it."""
    aside = None
    if final.exists():  # re-saving a step (e.g. after resuming from an older checkpoint)
        aside = root / f"{final.name}.replaced-{nonce}"
        os.replace(final, aside)
    os.replace(tmp, final)
    _fsync_dir(root)
    _write_text_atomic(root / LATEST, final.name + "\n")
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _commit_dir(root: Path, tmp: Path, final: Path, step: int, head_config, world_size: int, reports: list[dict],
                keep_last: Optional[int], nonce: str, finite: Optional[bool] = None) -> None:
    """Rank 0's commit of a written ``tmp`` directory: checks every rank's files, writes the
    manifest last, renames ``tmp`` to ``final``, updates ``latest`` and applies retention.
    Used by :func:`save_checkpoint` and by the asynchronous writer (``async_writer.py``).

    Args:
        reports: One ``{"files": {name: {"size", "sha256"}}, "range": [start, end]}`` per rank.
        finite: See :func:`save_checkpoint`.
    """
    all_files = _check_all_visible(root, tmp, reports)
    _write_manifest(tmp, make_manifest(step, head_config, world_size, reports, all_files, finite))
    _publish(root, tmp, final, nonce)
    _prune(root, keep_last, final)


# --------------------------------------------------------------------------------------------------
# Save (every rank)
# --------------------------------------------------------------------------------------------------
def _check_save_args(ctx: ParallelContext, keep_last: Optional[int], extra_state: dict) -> None:
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() != ctx.world_size:
        raise CheckpointError(
            f"the head's process group has {ctx.world_size} ranks but the job has {dist.get_world_size()}: "
            "replicated head groups are not supported by this checkpoint format"
        )
    _check_safe(extra_state, "extra_state")


def _write_rank_files(tmp: Path, head, head_optimizer, backbone_state: dict) -> dict:
    """Writes this rank's files into ``tmp`` (rank 0 also the replicated and backbone files).

    Args:
        backbone_state: ``backbone``, ``backbone_optimizer``, ``lr_scheduler``, ``scaler``,
            ``extra_state`` as given to :func:`save_checkpoint`.

    Returns:
        ``{file name: {"size", "sha256"}}``.
    """
    ctx: ParallelContext = head.ctx
    files = {}
    sharded, replicated = _split_head_state(head)
    shard_name = shard_file_name(head.class_start, head.class_start + head.num_local_classes)
    files[shard_name] = _save_file(_shard_payload(head, head_optimizer, sharded), tmp / shard_name)
    rng_name = rng_file_name(ctx.rank)
    files[rng_name] = _save_file(_rng_state(), tmp / rng_name)
    if ctx.rank == 0:
        rep = _replicated_payload(head, head_optimizer, replicated, sharded)
        _check_safe(rep, "head replicated state")
        files[REPLICATED_FILE] = _save_file(rep, tmp / REPLICATED_FILE)
        bb = _backbone_payload(**backbone_state)
        _check_safe(bb, "backbone state")
        files[BACKBONE_FILE] = _save_file(bb, tmp / BACKBONE_FILE)
    return files


def save_checkpoint(
    ckpt_root: PathLike,
    step: int,
    head: nn.Module,
    head_optimizer: Optional[torch.optim.Optimizer],
    *,
    backbone: Optional[nn.Module],
    backbone_optimizer: Optional[torch.optim.Optimizer] = None,
    lr_scheduler: Any = None,
    scaler: Any = None,
    extra_state: Optional[dict] = None,
    keep_last: Optional[int] = 3,
    finite: Optional[bool] = None,
) -> Path:
    """Writes one logical checkpoint ``<ckpt_root>/step_{step:09d}/`` atomically. Collective.

    Call on every rank of the head's process group (the whole job) with the same ``step``,
    ``ckpt_root`` (a file system every rank sees), ``extra_state`` and ``keep_last``.

    Args:
        ckpt_root: Directory holding this job's checkpoints (created if needed; one job per root).
        step: Global training step; names the directory.
        head: The :class:`partial_fc.PartialFCHead` (its shard ``weight [C_local, D]``, bank buffers
            ``[C_local, ...]``, replicated ``step`` and ``log_tau``).
        head_optimizer: Optimizer over the head's parameters only (SGD, AdamW, or any optimizer
            whose per-parameter state is row-aligned tensors plus scalars), or ``None``.
        backbone: The data-parallel backbone, bare or wrapped (DDP, DeepSpeed, torch.compile); its
            unwrapped ``state_dict`` is saved by rank 0. ``None`` saves no backbone.
        backbone_optimizer: The backbone's optimizer (replicated: saved by rank 0), its state dict
            already gathered (ZeRO: see ``train.engines.ZeroOptimizerCheckpoint``), or ``None``.
        lr_scheduler: Anything with ``state_dict()``/``load_state_dict()``, or ``None``.
        scaler: The AMP loss scaler (``torch.amp.GradScaler``), or ``None``.
        extra_state: Trainer state (epoch, data position, config...) made of tensors, numbers,
            strings, None and dict/list/tuple of those; returned by :func:`load_checkpoint`.
        keep_last: Number of newest verified checkpoints kept (older ones are deleted after this one
            is committed; see ``retention._prune``); ``None`` keeps all.
        finite: When given, recorded in the manifest as ``"finite"`` with ``"verified_step"``:
            the caller checked that every tensor of the state is finite. A checkpoint recorded
            as not finite is never resumed from nor counted by retention.

    Returns:
        The committed checkpoint directory.

    Raises:
        TypeError: ``extra_state`` (or a state dict) holds objects weights_only loading refuses.
        CheckpointError: A rank failed to write, or rank 0 cannot see another rank's file; every
            rank raises the same error and the previous checkpoint stays intact.
    """
    ctx: ParallelContext = head.ctx
    extra_state = dict(extra_state or {})
    _check_save_args(ctx, keep_last, extra_state)
    root = Path(ckpt_root)
    final = root / step_dir_name(step)
    tmp, nonce = _make_tmp_dir(root, final, ctx)  # 1.

    files, err = {}, None  # 2. every rank writes its files
    try:
        files = _write_rank_files(tmp, head, head_optimizer, dict(
            backbone=backbone, backbone_optimizer=backbone_optimizer, lr_scheduler=lr_scheduler, scaler=scaler,
            extra_state=extra_state))
    except Exception as e:  # noqa: BLE001 - reported to every rank below
        err = _format_exc(e)
    start, end = head.class_start, head.class_start + head.num_local_classes
    reports = _all_gather_json({"files": files, "range": [start, end], "error": err}, ctx)
    failed = [(r, rep["error"]) for r, rep in enumerate(reports) if rep["error"]]
    if failed:
        if ctx.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError("save_checkpoint failed: " + "; ".join(f"rank {r}: {e}" for r, e in failed))

    err = None  # 3. rank 0 commits; 4. every rank learns the outcome
    if ctx.rank == 0:
        try:
            _commit_dir(root, tmp, final, step, head.config, ctx.world_size, reports, keep_last, nonce, finite)
        except Exception as e:  # noqa: BLE001
            err = _format_exc(e)
    _raise_if_any_failed(err, ctx, f"committing checkpoint {final}")
    return final

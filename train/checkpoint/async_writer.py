"""Asynchronous checkpoints: training waits for a copy of the state, a thread writes it.

:class:`AsyncCheckpointWriter` saves the same checkpoint as :func:`train.checkpoint.save_checkpoint`
(same files, same manifest, same commit protocol: ``writer.py``; docs/checkpoints.md), split in two:

* **Staging, in the training thread** (the only stall): the temporary directory's name is agreed
  (one small all-gather), then every tensor of the state is copied into host memory that training
  no longer touches (a device-to-host copy on GPU; a clone on CPU). Collectives that gather state
  (ZeRO's backbone optimizer) run here too, before the copy.
* **Writing, in a background thread**: each rank writes its files with ``torch.save`` through a
  writer that hashes the bytes as they go (sha256, no re-read), fsyncs them, and then publishes a
  small report file (``report_rank<r>.json``, atomically renamed). Rank 0's thread waits for every
  rank's report, checks that it sees every file, writes ``manifest.json`` last, renames the
  directory atomically, rewrites ``latest`` and applies retention. The thread makes no collective
  call, so it never interleaves with the training's own collectives.

A crash at any moment leaves either the previous checkpoints and a ``.tmp-`` directory that
:func:`train.checkpoint.find_latest` ignores and retention deletes, or the new checkpoint
committed. :meth:`AsyncCheckpointWriter.wait` completes a save in progress: it joins the thread and
(collectively) makes every rank raise the same error if any rank's write or rank 0's commit
failed. The trainer calls it before the next save, before evaluating ``keep_best``, at the end of
training (also after SIGTERM/SIGUSR1, before exiting 75) and when closing.

Memory: a save in progress holds one host copy of this rank's state (for a 2,059,906-class head
on 8 ranks with SGD and a bank, about 1.6 GB per rank).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from partial_fc.distributed import ParallelContext

from .collectives import _raise_if_any_failed
from .durable import _fsync_dir, _name_disk_full, _write_json_atomic
from .format import (BACKBONE_FILE, REPLICATED_FILE, CheckpointError, _check_safe, _format_exc, rng_file_name,
                     shard_file_name, step_dir_name)
from .rng import _rng_state
from .state import _backbone_payload, _replicated_payload, _shard_payload, _split_head_state
from .writer import _commit_dir, _make_tmp_dir

__all__ = ["AsyncCheckpointWriter", "snapshot"]

log = logging.getLogger(__name__)

_REPORT = "report_rank{}.json"


def snapshot(obj: Any) -> Any:
    """A copy of ``obj`` whose tensors are host tensors that nothing else refers to.

    Device tensors are copied to the host (a new tensor: nothing to clone); host tensors are
    cloned, since training changes parameters and optimizer state in place. ``state_dict``
    metadata (``_metadata``) is kept.
    """
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        return t.cpu() if t.device.type != "cpu" else t.clone()
    if isinstance(obj, dict):
        out = type(obj)((k, snapshot(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):
            out._metadata = obj._metadata
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v) for v in obj)
    return obj


class _HashingFile:
    """A binary file that hashes what is written to it (``torch.save`` writes sequentially)."""

    def __init__(self, f) -> None:
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def write(self, b) -> int:
        self.h.update(b)
        n = self.f.write(b)
        self.n += len(b)
        return n

    def flush(self) -> None:
        self.f.flush()

    def tell(self) -> int:
        return self.n


def _write_file(obj: Any, path: Path) -> dict:
    """``torch.save`` + fsync, hashing while writing; ``{"size", "sha256"}``."""
    with _name_disk_full(path), open(path, "wb") as f:
        hf = _HashingFile(f)
        torch.save(obj, hf)
        f.flush()
        os.fsync(f.fileno())
    size = path.stat().st_size
    if size != hf.n:  # torch.save seeked back over what was hashed: never expected, but refuse
        raise CheckpointError(f"{path}: {size} bytes on disk, {hf.n} written through the hash")
    return {"size": size, "sha256": hf.h.hexdigest()}


def _stage(head: nn.Module, head_optimizer, backbone_state: dict) -> dict[str, Any]:
    """Host copies of every file's content for this rank: ``{file name: object}`` (the stall).

    Args:
        backbone_state: ``backbone``, ``backbone_optimizer``, ``scaler``, ``extra_state``.
    """
    ctx: ParallelContext = head.ctx
    start, end = head.class_start, head.class_start + head.num_local_classes
    sharded, replicated = _split_head_state(head)
    files: dict[str, Any] = {shard_file_name(start, end): snapshot(_shard_payload(head, head_optimizer, sharded)),
                             rng_file_name(ctx.rank): snapshot(_rng_state())}
    if ctx.rank == 0:
        rep = snapshot(_replicated_payload(head, head_optimizer, replicated, sharded))
        _check_safe(rep, "head replicated state")
        files[REPLICATED_FILE] = rep
        bb = _backbone_payload(lr_scheduler=None, copy=snapshot, **backbone_state)
        _check_safe(bb, "backbone state")
        files[BACKBONE_FILE] = bb
    return files


class _Pending:
    """One save in progress: its step, final directory, thread, outcome and timings."""

    def __init__(self, step: int, final: Path) -> None:
        self.step, self.final = step, final
        self.thread: Optional[threading.Thread] = None
        self.error: Optional[str] = None
        self.staged_s = 0.0
        self.written_s = 0.0


class AsyncCheckpointWriter:
    """Saves checkpoints of one job in the background (see the module docstring).

    Args:
        ckpt_root: The checkpoint directory (shared by every rank).
        ctx: The job's parallel context (the head's).
        commit_timeout_s: How long rank 0's thread waits for the other ranks' reports before it
            abandons the save (the previous checkpoint stays the newest).
    """

    def __init__(self, ckpt_root, ctx: ParallelContext, commit_timeout_s: float = 1800.0) -> None:
        self.root = Path(ckpt_root)
        self.ctx = ctx
        self.commit_timeout_s = commit_timeout_s
        self.pending: Optional[_Pending] = None
        self.last_stall_s = 0.0

    # ------------------------------------------------------------------------------------------
    def save(self, step: int, head: nn.Module, head_optimizer: Optional[torch.optim.Optimizer], *,
             backbone: Optional[nn.Module], backbone_optimizer: Any = None, scaler: Any = None,
             extra_state: Optional[dict] = None, keep_last: Optional[int] = 3,
             finite: Optional[bool] = None) -> Path:
        """Stages the state of ``step`` and starts writing it; returns the directory it will have.

        Collective (every rank, same arguments as :func:`train.checkpoint.save_checkpoint`; a
        ``backbone_optimizer`` is a torch optimizer or an already gathered state dict). A save
        still in progress is completed first.
        """
        self.wait()
        t0 = time.perf_counter()
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
        extra_state = dict(extra_state or {})
        _check_safe(extra_state, "extra_state")
        final = self.root / step_dir_name(step)
        tmp, nonce = _make_tmp_dir(self.root, final, self.ctx)
        # Staging: every tensor copied out of the training's reach (the stall of a save).
        files = _stage(head, head_optimizer, dict(backbone=backbone, backbone_optimizer=backbone_optimizer,
                                                  scaler=scaler, extra_state=extra_state))
        pending = _Pending(step, final)
        commit = dict(step=step, head_config=head.config, keep_last=keep_last, nonce=nonce, finite=finite,
                      range=[head.class_start, head.class_start + head.num_local_classes])
        pending.thread = threading.Thread(target=self._write, args=(pending, files, tmp, commit),
                                          name=f"checkpoint-{step}", daemon=True)
        pending.staged_s = self.last_stall_s = time.perf_counter() - t0
        self.pending = pending
        pending.thread.start()
        return final

    def _write(self, pending: _Pending, files: dict, tmp: Path, commit: dict) -> None:
        """The background thread: writes this rank's files, publishes its report; rank 0 commits."""
        w0 = time.perf_counter()
        rank, world = self.ctx.rank, self.ctx.world_size
        try:
            records, error = {}, None
            try:
                for name, obj in files.items():
                    records[name] = _write_file(obj, tmp / name)
            except Exception as e:  # noqa: BLE001 - published to rank 0 and to every rank at wait()
                error = _format_exc(e)
            _write_json_atomic(tmp / _REPORT.format(rank), {"files": records, "range": commit["range"], "error": error})
            if error:
                if rank == 0:  # the other ranks may still write into tmp: remove it only after their reports
                    self._collect_reports(tmp, world, raise_failed=False)
                raise CheckpointError(error)
            if rank == 0:
                reports = self._collect_reports(tmp, world)
                for r in range(world):
                    (tmp / _REPORT.format(r)).unlink()
                _fsync_dir(tmp)
                _commit_dir(self.root, tmp, pending.final, commit["step"], commit["head_config"], world, reports,
                            commit["keep_last"], commit["nonce"], commit["finite"])
        except Exception as e:  # noqa: BLE001
            pending.error = _format_exc(e)
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
        finally:
            files.clear()  # the staged copy is released as soon as it is on disk
            pending.written_s = time.perf_counter() - w0

    def _collect_reports(self, tmp: Path, world: int, raise_failed: bool = True) -> list[dict]:
        """Rank 0's thread: waits for every rank's report file; raises if it timed out or (``raise_failed``)
        a rank failed."""
        deadline = time.monotonic() + self.commit_timeout_s
        reports: list[Optional[dict]] = [None] * world
        while True:
            for r in range(world):
                p = tmp / _REPORT.format(r)
                if reports[r] is None and p.is_file():
                    reports[r] = json.loads(p.read_text())
            if all(rep is not None for rep in reports):
                break
            if time.monotonic() > deadline:
                missing = [r for r, rep in enumerate(reports) if rep is None]
                raise CheckpointError(f"rank(s) {missing} did not finish writing {tmp} within "
                                      f"{self.commit_timeout_s:.0f} s (crashed, or {self.root} is not shared)")
            time.sleep(0.02)
        failed = [(r, rep["error"]) for r, rep in enumerate(reports) if rep["error"]]
        if failed and raise_failed:
            raise CheckpointError("; ".join(f"rank {r}: {e}" for r, e in failed))
        return reports  # type: ignore[return-value]

    # ------------------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        """Whether a save is still being written."""
        return self.pending is not None and self.pending.thread.is_alive()

    def wait(self, collective: bool = True) -> Optional[Path]:
        """Completes the save in progress, if any; returns its directory.

        Args:
            collective: Make every rank raise the same :class:`CheckpointError` if any rank's part
                failed (one small all-gather; every rank must call it). ``False`` only joins the
                thread and logs a failure (for exit paths where another rank may be gone).
        """
        p, self.pending = self.pending, None
        if p is None:  # saves are collective, so no rank has one in progress
            return None
        p.thread.join()
        if collective:
            _raise_if_any_failed(p.error, self.ctx, f"writing checkpoint {p.final}")
        elif p.error:
            log.error("checkpoint %s was not completed: %s", p.final, p.error)
        return p.final

"""Checkpoints of a Partial FC job: one logical checkpoint per save, loadable on any world size.

A checkpoint is a directory ``<root>/step_000001234/`` (see docs/checkpoints.md)::

    manifest.json                                   written LAST by rank 0: the commit record
    backbone.pt                                     backbone weights, backbone optimizer, lr
                                                    scheduler, loss scaler, extra (trainer) state
    head_replicated.pt                              head state every rank holds alike (step,
                                                    log_tau), its optimizer state, param groups
    head_classes_000000000_000000006.pt             one per saving rank, named by CLASS RANGE:
    head_classes_000000006_000000011.pt             W rows, bank rows, optimizer rows of W
    rng_rank0.pt, rng_rank1.pt                      per-process RNG states

Class-sharded state (``weight`` and every ``bank.*`` buffer, and the optimizer state of ``weight``)
is cut along dim 0 by class id, so a job on ``M`` ranks computes its ranges with
``ClassPartition(num_classes, M)`` and reads only the overlapping rows of the shard files that
intersect them (``torch.load(..., weights_only=True, mmap=True)``: a rank never materialises rows it
does not own).

Save protocol (atomic; all ranks call :func:`save_checkpoint`):

1. rank 0 creates ``step_X.tmp-<nonce>/`` and broadcasts the nonce;
2. every rank writes and fsyncs its files and hashes them (sha256);
3. the file records are all-gathered; rank 0 checks that it sees every file (shared file system),
   writes ``manifest.json`` (fsync), renames the directory to ``step_X/`` (``os.replace``), fsyncs
   the root, atomically rewrites the ``latest`` pointer, then deletes checkpoints beyond
   ``keep_last`` and stale ``.tmp-`` directories;
4. the outcome is all-gathered so every rank returns (or raises) together.

A crash before the rename leaves only a ``.tmp-`` directory that :func:`find_latest` ignores; the
previous checkpoint is untouched.

Safety: every file is read with ``torch.load(..., weights_only=True)`` and checked against the
manifest's size and sha256 first; metadata is JSON. Nothing in a checkpoint can run code.

Gradient/optimizer semantics:
    Rows of W are saved and restored with their own optimizer state, row for row (SGD
    ``momentum_buffer``, AdamW ``exp_avg``/``exp_avg_sq``; the scalar per-parameter ``step`` is the
    same on every rank and is kept once per shard file). Partial FC samples a subset of classes per
    step: a row that is not sampled is left alone by the lazy row optimizers (``head.row_update``)
    or gets a zero gradient from a dense one (SGD momentum decays, AdamW moments decay); either way
    the checkpoint records the state exactly, so such
    rows keep their optimizer state unchanged through save/load and through resharding. Resharding
    moves rows between ranks but never mixes, averages or resets them.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import random
import re
import secrets
import shutil
import time
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from partial_fc.distributed import ParallelContext
from partial_fc.sharding import ClassPartition, step_seed

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "find_latest",
    "list_checkpoints",
    "check_checkpoint",
    "export_backbone_state",
    "load_backbone_and_extra",
    "read_manifest",
]

log = logging.getLogger(__name__)

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
# Small helpers: names, hashing, fsync, JSON collectives
# --------------------------------------------------------------------------------------------------
def step_dir_name(step: int) -> str:
    """``step_000001234`` for step 1234."""
    return f"step_{int(step):09d}"


def shard_file_name(start: int, end: int) -> str:
    """``head_classes_{start:09d}_{end:09d}.pt`` for classes ``[start, end)``."""
    return f"head_classes_{start:09d}_{end:09d}.pt"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


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


def _save_file(obj: Any, path: Path) -> dict:
    """``torch.save`` + fsync; returns ``{"size", "sha256"}`` of the bytes on disk."""
    with _name_disk_full(path):
        with open(path, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    return {"size": path.stat().st_size, "sha256": _sha256(path)}


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}{_TMP_MARK}{secrets.token_hex(4)}")
    with _name_disk_full(tmp), open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _comm_device(ctx: ParallelContext) -> torch.device:
    if dist.get_backend(ctx.group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather_json(obj: Any, ctx: ParallelContext) -> list:
    """All-gathers a JSON-serialisable object (no pickle); ``[obj]`` when not distributed."""
    if not ctx.is_distributed:
        return [obj]
    data = json.dumps(obj).encode()
    dev = _comm_device(ctx)
    size = torch.tensor([len(data)], dtype=torch.int64, device=dev)
    sizes = [torch.zeros_like(size) for _ in range(ctx.world_size)]
    dist.all_gather(sizes, size, group=ctx.group)
    longest = max(int(s) for s in sizes)
    buf = torch.zeros(longest, dtype=torch.uint8, device=dev)
    if data:
        buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(dev)
    outs = [torch.empty_like(buf) for _ in range(ctx.world_size)]
    dist.all_gather(outs, buf, group=ctx.group)
    return [json.loads(bytes(o[: int(s)].cpu().tolist()).decode()) for o, s in zip(outs, sizes)]


def _raise_if_any_failed(local_error: Optional[str], ctx: ParallelContext, what: str) -> None:
    """Every rank raises the same error if any rank failed, so no rank is left in a collective."""
    errors = _all_gather_json(local_error, ctx)
    failed = [(r, e) for r, e in enumerate(errors) if e]
    if failed:
        detail = "; ".join(f"rank {r}: {e}" for r, e in failed)
        raise CheckpointError(f"{what} failed on {len(failed)} rank(s): {detail}")


def _format_exc(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


# --------------------------------------------------------------------------------------------------
# What is class-sharded, what is replicated
# --------------------------------------------------------------------------------------------------
_SHARDED_NAMES = ("weight",)
_SHARDED_PREFIXES = ("bank.",)


def _split_head_state(head: nn.Module) -> tuple[dict, dict]:
    """Splits ``head.state_dict()`` into class-sharded ``[C_local, ...]`` and replicated entries.

    Class-sharded: ``weight`` and every ``bank.*`` buffer (cut along dim 0 by class). Everything
    else must be a replicated scalar (``step``, ``log_tau``); a non-scalar entry that is not known to
    be sharded is refused rather than silently saved from rank 0 only.
    """
    sharded, replicated = {}, {}
    n_local = head.num_local_classes
    for name, t in head.state_dict(keep_vars=False).items():
        if name in _SHARDED_NAMES or name.startswith(_SHARDED_PREFIXES):
            if t.dim() == 0 or t.shape[0] != n_local:
                raise CheckpointError(
                    f"head state {name!r} has shape {tuple(t.shape)}, expected [{n_local}, ...] (class-sharded)"
                )
            sharded[name] = t.detach()
        elif t.dim() == 0:
            replicated[name] = t.detach()
        else:
            raise CheckpointError(
                f"head state {name!r} (shape {tuple(t.shape)}) is neither a known class-sharded entry "
                f"({_SHARDED_NAMES}, {_SHARDED_PREFIXES}*) nor a replicated scalar; teach "
                "train/checkpoint.py how to shard it"
            )
    return sharded, replicated


def _param_names(head: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> list[list[str]]:
    """Names (from ``head.named_parameters()``) of each param group's parameters, matched by id."""
    if optimizer is None:
        return []
    by_id = {id(p): n for n, p in head.named_parameters()}
    groups = []
    for gi, group in enumerate(optimizer.param_groups):
        names = []
        for p in group["params"]:
            if id(p) not in by_id:
                raise CheckpointError(
                    f"head_optimizer param group {gi} holds a parameter of shape {tuple(p.shape)} that is not "
                    "one of the head's parameters; give the head its own optimizer"
                )
            names.append(by_id[id(p)])
        groups.append(names)
    return groups


def _optimizer_state_by_name(head: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> dict[str, dict]:
    """``{param name: {state key: value}}`` for the head optimizer (the live state, not a copy)."""
    if optimizer is None:
        return {}
    names = {id(p): n for n, p in head.named_parameters()}
    _param_names(head, optimizer)  # validates membership
    return {names[id(p)]: dict(s) for p, s in optimizer.state.items() if s}


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


# --------------------------------------------------------------------------------------------------
# RNG
# --------------------------------------------------------------------------------------------------
def _rng_state() -> dict:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                          "has_gauss": int(has_gauss), "gauss": float(gauss)}
    except ImportError:
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        try:
            import numpy as np

            s = state["numpy"]
            np.random.set_state((s["kind"], s["keys"].numpy().astype("uint32"), s["pos"], s["has_gauss"], s["gauss"]))
        except ImportError:
            pass
    if "cuda" in state and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            log.warning("checkpoint has CUDA RNG states for %d devices, this process sees %d: not restored",
                        len(state["cuda"]), torch.cuda.device_count())


def _reseed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    try:
        import numpy as np

        np.random.seed(seed % (1 << 32))
    except ImportError:
        pass


# --------------------------------------------------------------------------------------------------
# Backbone wrappers
# --------------------------------------------------------------------------------------------------
def _unwrap(model: nn.Module) -> nn.Module:
    """The bare module inside DDP / DataParallel / DeepSpeed / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) or (
            type(model).__name__ == "DeepSpeedEngine" and hasattr(model, "module")
        ):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _strip_module_prefix(state: dict) -> dict:
    if state and all(k.startswith("module.") for k in state):
        return OrderedDict((k[len("module."):], v) for k, v in state.items())
    return state


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


def _check_files(path: Path, manifest: dict, names, hashes: bool) -> None:
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


def _check_complete(path: Path) -> dict:
    """Manifest valid, every listed file present with its recorded size (cheap: no hashing)."""
    manifest = read_manifest(path)
    _check_files(path, manifest, manifest["files"], hashes=False)
    return manifest


def _load(path: Path, manifest: dict, name: str, verify: bool, mmap: bool = True) -> Any:
    _check_files(path, manifest, [name], hashes=verify)
    try:
        return torch.load(path / name, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - UnpicklingError, RuntimeError for bad zips, ...
        raise CheckpointError(
            f"refused to load {path / name} with weights_only=True ({type(e).__name__}: {e}); "
            "the file is corrupted or not a partial-fc checkpoint file (it may contain code)"
        ) from e


# --------------------------------------------------------------------------------------------------
# Discovery and retention
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


# --------------------------------------------------------------------------------------------------
# Save
# --------------------------------------------------------------------------------------------------
def _shard_payload(head: nn.Module, head_optimizer: Optional[torch.optim.Optimizer], sharded: dict) -> dict:
    n_local = head.num_local_classes
    sharded_params = {n for n, _ in head.named_parameters() if n in sharded}
    optim = {}
    for name, state in _optimizer_state_by_name(head, head_optimizer).items():
        if name not in sharded_params:
            continue
        rows, scalars = {}, {}
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.dim() >= 1:
                if value.shape[0] != n_local:
                    raise CheckpointError(
                        f"optimizer state {key!r} of {name!r} has shape {tuple(value.shape)}: not row-aligned "
                        f"with the {n_local} local classes, so it cannot be resharded (unsupported optimizer)"
                    )
                rows[key] = value.detach().cpu()
            else:
                scalars[key] = _to_cpu(value)
        optim[name] = {"rows": rows, "scalars": scalars}
    start = head.class_start
    return {
        "start": start,
        "end": start + n_local,
        "state": {k: v.cpu() for k, v in sharded.items()},
        "optim": optim,
    }


def _replicated_payload(head, head_optimizer, replicated: dict, sharded: dict) -> dict:
    group_names = _param_names(head, head_optimizer)
    optim_state = {n: _to_cpu(s) for n, s in _optimizer_state_by_name(head, head_optimizer).items() if n not in sharded}
    groups = []
    if head_optimizer is not None:
        for names, group in zip(group_names, head_optimizer.param_groups):
            g = {k: _to_cpu(v) for k, v in group.items() if k != "params"}
            g["params"] = names
            groups.append(g)
    return {
        "state": {k: v.cpu() for k, v in replicated.items()},
        "optim_state": optim_state,
        "param_groups": groups,
        "optimizer": None if head_optimizer is None else type(head_optimizer).__name__,
    }


def _commit_dir(root: Path, tmp: Path, final: Path, step: int, head_config, world_size: int, reports: list[dict],
                keep_last: Optional[int], nonce: str, finite: Optional[bool] = None) -> None:
    """Rank 0's commit of a written ``tmp`` directory: checks every rank's files, writes the
    manifest last, renames ``tmp`` to ``final``, updates ``latest`` and applies retention.
    Used by :func:`save_checkpoint` and by the asynchronous writer (``train/checkpoint_writer.py``).

    Args:
        reports: One ``{"files": {name: {"size", "sha256"}}, "range": [start, end]}`` per rank.
        finite: See :func:`save_checkpoint`.
    """
    all_files = {}
    for rep in reports:
        all_files.update(rep["files"])
    for name, rec in all_files.items():  # a rank writing to a disk rank 0 cannot see fails here
        p = tmp / name
        if not p.is_file() or p.stat().st_size != rec["size"]:
            raise CheckpointError(f"rank 0 cannot see {p} as written by its rank: is {root} shared?")
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
        "rng_files": [f"rng_rank{r}.pt" for r in range(world_size)],
        "files": dict(sorted(all_files.items())),
    }
    if finite is not None:
        # The trainer checked every tensor of this state (all ranks) just before the save.
        manifest["finite"] = bool(finite)
        manifest["verified_step"] = int(step)
    mtmp = tmp / f"{MANIFEST}.partial"
    with _name_disk_full(mtmp), open(mtmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(mtmp, tmp / MANIFEST)
    _fsync_dir(tmp)
    aside = None
    if final.exists():  # re-saving a step (e.g. after resuming from an older checkpoint)
        aside = root / f"{final.name}.replaced-{nonce}"
        os.replace(final, aside)
    os.replace(tmp, final)
    _fsync_dir(root)
    _write_text_atomic(root / LATEST, final.name + "\n")
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    _prune(root, keep_last, final)


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
            is committed; see :func:`_prune`); ``None`` keeps all.
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
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() != ctx.world_size:
        raise CheckpointError(
            f"the head's process group has {ctx.world_size} ranks but the job has {dist.get_world_size()}: "
            "replicated head groups are not supported by this checkpoint format"
        )
    extra_state = dict(extra_state or {})
    _check_safe(extra_state, "extra_state")
    root = Path(ckpt_root)
    final = root / step_dir_name(step)

    # 1. rank 0 makes the temporary directory; everyone learns its name.
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
    tmp = root / f"{final.name}{_TMP_MARK}{nonces[0]['nonce']}"

    # 2. every rank writes its files.
    files, err = {}, None
    sharded, start, end = {}, head.class_start, head.class_start + head.num_local_classes
    try:
        sharded, replicated = _split_head_state(head)
        shard_name = shard_file_name(start, end)
        files[shard_name] = _save_file(_shard_payload(head, head_optimizer, sharded), tmp / shard_name)
        rng_name = f"rng_rank{ctx.rank}.pt"
        files[rng_name] = _save_file(_rng_state(), tmp / rng_name)
        if ctx.rank == 0:
            rep = _replicated_payload(head, head_optimizer, replicated, sharded)
            _check_safe(rep, "head replicated state")
            files[REPLICATED_FILE] = _save_file(rep, tmp / REPLICATED_FILE)
            bb = {
                "model": None if backbone is None else _to_cpu(_unwrap(backbone).state_dict()),
                "optimizer": None if backbone_optimizer is None else _to_cpu(
                    backbone_optimizer if isinstance(backbone_optimizer, dict) else backbone_optimizer.state_dict()),
                "lr_scheduler": None if lr_scheduler is None else _to_cpu(lr_scheduler.state_dict()),
                "scaler": None if scaler is None else _to_cpu(scaler.state_dict()),
                "extra": _to_cpu(extra_state),
            }
            _check_safe(bb, "backbone state")
            files[BACKBONE_FILE] = _save_file(bb, tmp / BACKBONE_FILE)
    except Exception as e:  # noqa: BLE001 - reported to every rank below
        err = _format_exc(e)
    reports = _all_gather_json({"files": files, "range": [start, end], "error": err}, ctx)
    failed = [(r, rep["error"]) for r, rep in enumerate(reports) if rep["error"]]
    if failed:
        if ctx.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError("save_checkpoint failed: " + "; ".join(f"rank {r}: {e}" for r, e in failed))

    # 3. rank 0 commits.
    err = None
    if ctx.rank == 0:
        try:
            _commit_dir(root, tmp, final, step, head.config, ctx.world_size, reports, keep_last, nonces[0]["nonce"],
                        finite)
        except Exception as e:  # noqa: BLE001
            err = _format_exc(e)
    _raise_if_any_failed(err, ctx, f"committing checkpoint {final}")
    return final


# --------------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------------
def _validate_manifest(path: Path, manifest: dict, head: nn.Module) -> None:
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


def _load_head_shards(path: Path, manifest: dict, head: nn.Module, verify: bool) -> dict[str, dict]:
    """Fills the head's class-sharded state from the overlapping rows of every shard file.

    Returns:
        ``{param name: {state key: tensor or scalar}}``, the optimizer state of sharded parameters
        for this rank's rows.
    """
    sharded, _ = _split_head_state(head)
    lo, hi = head.class_start, head.class_start + head.num_local_classes
    filled = {k: 0 for k in sharded}
    optim_rows: dict[str, dict[str, torch.Tensor]] = {}
    optim_scalars: dict[str, dict] = {}
    optim_seen = {}
    for shard in manifest["shards"]:
        s, e = shard["start"], shard["end"]
        a, b = max(lo, s), min(hi, e)
        if a >= b:
            continue
        payload = _load(path, manifest, shard["file"], verify)
        if (payload["start"], payload["end"]) != (s, e):
            raise CheckpointError(f"{path / shard['file']} holds classes {payload['start']}..{payload['end']}, "
                                  f"the manifest says {s}..{e}")
        missing = set(sharded) - set(payload["state"])
        unexpected = set(payload["state"]) - set(sharded)
        if missing or unexpected:
            raise CheckpointError(
                f"{path} does not match the head's class-sharded state: missing {sorted(missing)}, "
                f"unexpected {sorted(unexpected)} (was it saved with a different method?)"
            )
        with torch.no_grad():
            for key, target in sharded.items():
                target[a - lo : b - lo].copy_(payload["state"][key][a - s : b - s])
                filled[key] += b - a
        for pname, st in payload["optim"].items():
            optim_seen[pname] = optim_seen.get(pname, 0) + (b - a)
            rows = optim_rows.setdefault(pname, {})
            for key, value in st["rows"].items():
                if key not in rows:
                    rows[key] = torch.empty((hi - lo, *value.shape[1:]), dtype=value.dtype)
                rows[key][a - lo : b - lo] = value[a - s : b - s]
            scal = optim_scalars.setdefault(pname, {})
            for key, value in st["scalars"].items():
                if key in scal and isinstance(value, torch.Tensor) and not torch.equal(scal[key], value):
                    warnings.warn(f"optimizer scalar {pname}.{key} differs between shard files "
                                  f"({scal[key]} vs {value}); keeping the larger", stacklevel=3)
                    value = torch.maximum(scal[key], value)
                scal[key] = value.clone() if isinstance(value, torch.Tensor) else value
    assert all(v == hi - lo for v in filled.values()), "shard ranges validated to tile the classes"
    out = {}
    for pname, rows in optim_rows.items():
        if optim_seen[pname] != hi - lo:
            raise CheckpointError(
                f"{path}: only some shard files hold optimizer state for {pname!r}; the checkpoint is inconsistent"
            )
        out[pname] = {**optim_scalars.get(pname, {}), **rows}
    return out


def _load_optimizer(head, head_optimizer, replicated: dict, sharded_state: dict, path: Path) -> None:
    saved_cls = replicated["optimizer"]
    if saved_cls is None:
        warnings.warn(f"{path} holds no head optimizer state; the head optimizer starts fresh", stacklevel=3)
        return
    if saved_cls != type(head_optimizer).__name__:
        raise CheckpointError(f"{path} holds {saved_cls} state for the head, the head optimizer is "
                              f"{type(head_optimizer).__name__}")
    names = _param_names(head, head_optimizer)
    saved_groups = replicated["param_groups"]
    if [sorted(g["params"]) for g in saved_groups] != [sorted(n) for n in names]:
        raise CheckpointError(
            f"head optimizer param groups differ from the checkpoint's: saved "
            f"{[g['params'] for g in saved_groups]}, now {names}"
        )
    index = {}
    current = head_optimizer.state_dict()["param_groups"]
    for group_names, group in zip(names, current):
        index.update(zip(group_names, group["params"]))
    state_by_name = {**replicated["optim_state"], **sharded_state}
    groups = []
    for saved, group in zip(saved_groups, current):
        g = {k: v for k, v in saved.items() if k != "params"}
        g["params"] = list(group["params"])
        groups.append(g)
    head_optimizer.load_state_dict(
        {"state": {index[n]: dict(s) for n, s in state_by_name.items() if n in index}, "param_groups": groups}
    )


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
        manifest = read_manifest(path)
        if manifest.get("finite") is False:
            raise CheckpointError(f"{path}: its manifest records non-finite values; it cannot be resumed from")
        _check_files(path, manifest, manifest["files"], hashes=False)
        _validate_manifest(path, manifest, head)
        lo, hi = head.class_start, head.class_start + head.num_local_classes
        names = [sh["file"] for sh in manifest["shards"] if max(lo, sh["start"]) < min(hi, sh["end"])]
        names += [REPLICATED_FILE, BACKBONE_FILE]
        if manifest["world_size"] == ctx.world_size:
            names.append(f"rng_rank{ctx.rank}.pt")
        _check_files(path, manifest, names, hashes=verify)
        rep = _load(path, manifest, REPLICATED_FILE, False, mmap=False)
        _, replicated = _split_head_state(head)
        if set(rep["state"]) != set(replicated):
            raise CheckpointError(f"{path}: replicated head state {sorted(rep['state'])} does not match the "
                                  f"head's {sorted(replicated)} (different method or temperature?)")
        if head_optimizer is not None and rep["optimizer"] is not None:
            if rep["optimizer"] != type(head_optimizer).__name__:
                raise CheckpointError(f"{path} holds {rep['optimizer']} state for the head, the head optimizer is "
                                      f"{type(head_optimizer).__name__}")
            names_now = _param_names(head, head_optimizer)
            if [sorted(g["params"]) for g in rep["param_groups"]] != [sorted(n) for n in names_now]:
                raise CheckpointError(f"{path}: head optimizer param groups differ from the checkpoint's")
        if backbone is not None:
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
    except Exception as e:  # noqa: BLE001 - every rank raises together below
        if not ctx.is_distributed:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"{path}: {_format_exc(e)}") from e
        err = _format_exc(e)
    _raise_if_any_failed(err, ctx, f"checking checkpoint {path}")
    return manifest


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
        backbone: Backbone to load into (bare or wrapped), or ``None`` to skip.
        backbone_optimizer: Backbone optimizer to load into, or ``None``.
        lr_scheduler: Scheduler to load into, or ``None``.
        scaler: Loss scaler to load into, or ``None``.
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
        sharded_optim = _load_head_shards(path, manifest, head, verify)
        rep = _load(path, manifest, REPLICATED_FILE, verify, mmap=False)
        _, replicated = _split_head_state(head)
        if set(rep["state"]) != set(replicated):
            raise CheckpointError(f"{path}: replicated head state {sorted(rep['state'])} does not match the "
                                  f"head's {sorted(replicated)} (different method or temperature?)")
        with torch.no_grad():
            for key, target in replicated.items():
                target.copy_(rep["state"][key])
        if head_optimizer is not None:
            _load_optimizer(head, head_optimizer, rep, sharded_optim, path)
        # Not memory-mapped: optimizer state loaded from it is updated in place later.
        bb = _load(path, manifest, BACKBONE_FILE, verify, mmap=False)
        for obj, key in ((backbone, "model"), (backbone_optimizer, "optimizer"),
                         (lr_scheduler, "lr_scheduler"), (scaler, "scaler")):
            if obj is not None and bb[key] is None:
                if getattr(obj, "missing_ok", False):  # e.g. a ZeRO run saved before its state was kept
                    warnings.warn(f"{path} holds no {key} state; it starts fresh", stacklevel=2)
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
        extra = bb["extra"]
        if restore_rng:
            if manifest["world_size"] == ctx.world_size:
                _set_rng_state(_load(path, manifest, f"rng_rank{ctx.rank}.pt", verify, mmap=False))
            else:
                _reseed(step_seed(int(head.config.seed), int(manifest["step"]), ctx.rank))
                if ctx.rank == 0:
                    log.info("checkpoint %s was saved on %d ranks, loading on %d: RNGs reseeded per rank",
                             path, manifest["world_size"], ctx.world_size)
    except Exception as e:  # noqa: BLE001 - every rank raises together below
        err = _format_exc(e)
        if not ctx.is_distributed:
            raise
    _raise_if_any_failed(err, ctx, f"loading checkpoint {path}")
    return extra


def export_backbone_state(path_ckpt: PathLike, verify: bool = True) -> dict:
    """The backbone's weights alone (unwrapped ``state_dict``), e.g. for ONNX export or evaluation.

    Args:
        path_ckpt: A checkpoint directory, or a checkpoint root (its newest complete checkpoint).
        verify: Check ``backbone.pt`` against its sha256 first.

    Returns:
        The backbone ``state_dict`` (CPU tensors, no ``module.`` prefixes).

    Raises:
        CheckpointError: No checkpoint found, or it holds no backbone.
    """
    return load_backbone_and_extra(path_ckpt, verify)[0]


def load_backbone_and_extra(path_ckpt: PathLike, verify: bool = True) -> tuple[dict, dict]:
    """The backbone's weights and the trainer's ``extra_state`` (backbone name, embedding size, ...).

    Args:
        path_ckpt: A checkpoint directory, or a checkpoint root (its newest complete checkpoint).
        verify: Check ``backbone.pt`` against its sha256 first.

    Returns:
        ``(state_dict, extra_state)``; the state dict has CPU tensors and no ``module.`` prefixes.

    Raises:
        CheckpointError: No checkpoint found, or it holds no backbone.
    """
    path = Path(path_ckpt)
    if not (path / MANIFEST).is_file() and not _STEP_RE.match(path.name):
        latest = find_latest(path)
        if latest is None:
            raise CheckpointError(f"no complete checkpoint under {path}")
        path = latest
    manifest = read_manifest(path)
    bb = _load(path, manifest, BACKBONE_FILE, verify, mmap=False)
    if bb["model"] is None:
        raise CheckpointError(f"{path} was saved without a backbone")
    return _strip_module_prefix(bb["model"]), dict(bb.get("extra") or {})

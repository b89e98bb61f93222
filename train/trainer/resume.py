"""Where a run starts: the checkpoint to resume from (with fall-back past damaged ones), restoring
it, or a pretrained backbone (``model.init_from``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch

from .state import TrainState

log = logging.getLogger("train.trainer")

__all__ = ["start", "choose_checkpoint", "resume", "init_from"]


def choose_checkpoint(cfg, ckpt_root: Path, head, head_opt, backbone, rank: int) -> Optional[Path]:
    """The checkpoint to resume from (checked against this job), or ``None`` for a fresh start.

    ``resume = "auto"``/``"auto-or-fresh"`` try the checkpoints newest first and fall back
    from a damaged, non-finite or incompatible one to the newest that passes
    :func:`check_checkpoint`, with a warning in the run log naming both. When none passes,
    ``"auto"`` is an error and ``"auto-or-fresh"`` starts from step 0. An explicit path must
    pass. Collective.
    """
    from ..checkpoint import CheckpointError, check_checkpoint, list_checkpoints

    mode = cfg.checkpoint.resume
    if mode not in ("auto", "auto-or-fresh"):
        check_checkpoint(Path(mode), head, head_opt, backbone=backbone)
        return Path(mode)
    rejected: list[tuple[Path, str]] = []
    for path in list_checkpoints(ckpt_root):
        try:
            check_checkpoint(path, head, head_opt, backbone=backbone)
        except CheckpointError as e:
            rejected.append((path, str(e)))
            if rank == 0:
                log.warning("checkpoint %s cannot be resumed from: %s", path, e)
            continue
        if rejected and rank == 0:
            log.warning("auto-resume falls back from %s (the newest checkpoint; damaged or incompatible) to %s",
                        rejected[0][0], path)
        return path
    if not rejected:
        return None
    listing = "; ".join(f"{p.name}: {e}" for p, e in rejected)
    if mode == "auto":
        raise CheckpointError(
            f"no valid checkpoint in {ckpt_root} to resume from ({listing}). Repair or move them away, "
            'or set checkpoint.resume = "auto-or-fresh" to start from step 0 (its saves then replace those '
            "step directories)"
        )
    if rank == 0:
        log.warning('checkpoint.resume = "auto-or-fresh": no valid checkpoint in %s (%d rejected); starting '
                    "from step 0", ckpt_root, len(rejected))
    return None


def _hyperparameters(optimizers) -> list[list[dict]]:
    """The configured param-group settings (base_lr, weight decay, momentum...) of the optimizers."""
    return [[{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] for opt in optimizers]


def _apply_hyperparameters(optimizers, configured: list[list[dict]], rank: int) -> None:
    """Puts the configured settings back after a checkpoint restored its saved param groups.

    The config decides the hyperparameters of a resumed run (so a rerun with a lower
    optimizer.lr after a divergence really is one); the checkpoint gives the state (momenta,
    moments, step counts). With an unchanged config this changes nothing.
    """
    for opt, groups in zip(optimizers, configured):
        for g, want in zip(opt.param_groups, groups):
            changed = sorted(k for k, v in want.items() if k != "lr" and str(g.get(k)) != str(v))
            if changed and rank == 0:
                log.warning("resume: %s param group settings %s come from the config, not the checkpoint "
                            "(%s -> %s)", type(opt).__name__, changed, [g.get(k) for k in changed],
                            [want[k] for k in changed])
            g.update(want)


def resume(path: Path, *, cfg, engine, head, head_opt, scaler, world: int, samples_per_rank: int,
           rank: int) -> TrainState:
    """Loads checkpoint ``path`` (already checked) into the run; returns its progress counters."""
    from ..checkpoint import load_checkpoint

    optimizers = (engine.optimizer, head_opt)
    configured = _hyperparameters(optimizers)
    extra = load_checkpoint(path, head, head_opt, backbone=engine.module,
                            backbone_optimizer=engine.checkpoint_optimizer,
                            scaler=scaler if scaler.is_enabled() else None,
                            verify=False)  # hashed by check_checkpoint just before
    engine.weights_loaded()  # ZeRO: its fp32 master copy follows the loaded weights
    _apply_hyperparameters(optimizers, configured, rank)
    st = TrainState(**extra["train_state"])
    # A fresh count: the checkpoint holds a finite state, and a count restored from before the
    # save would stop a resumed run (e.g. one lowering optimizer.lr after a divergence) at once.
    st.consecutive_nonfinite = 0
    batch = cfg.data.batch_size
    saved_world, saved_batch = int(extra.get("world_size", world)), int(extra.get("batch_size", 0))
    if (saved_world, saved_batch) != (world, batch):
        # The epoch order is one global permutation that rank r reads with stride world_size,
        # so the samples already consumed are its first position * world_size entries whatever
        # the world size: resume at that global offset (rounded down to a whole global batch).
        consumed = int(extra.get("global_position", st.position * saved_world))
        st.position = min((consumed // (batch * world)) * batch, samples_per_rank)
        log.warning("resuming a checkpoint of %d rank(s) x batch %d on %d rank(s) x batch %d: data "
                    "position %d of epoch %d maps to %d per rank", saved_world, saved_batch, world,
                    batch, consumed, st.epoch, st.position)
    if rank == 0:
        log.info("resumed from %s at step %d (epoch %d, position %d per rank)", path, st.step, st.epoch,
                 st.position)
    return st


def _read_init_source(source: str, checkpoint_dir: str) -> tuple[dict, dict]:
    from ..checkpoint import CheckpointError, load_backbone_and_extra

    path = Path(source)
    if path.is_file():
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a clear message for any unreadable file
            raise CheckpointError(f"model.init_from = {source!r} is not a backbone file torch.load(weights_only=True) "
                                  f"can read ({type(e).__name__}: {e})") from e
        if not isinstance(payload, dict) or "state_dict" not in payload:
            raise CheckpointError(f"model.init_from = {source!r} is not an exported backbone (pfc export's "
                                  "backbone.pt with 'state_dict' and 'metadata'), nor a checkpoint directory")
        return payload["state_dict"], dict(payload.get("metadata") or {})
    if path.is_dir():
        root = path / checkpoint_dir if (path / checkpoint_dir).is_dir() else path
        return load_backbone_and_extra(root)  # a checkpoint, a checkpoint root or a run directory
    raise CheckpointError(f"model.init_from = {source!r} does not exist")


def init_from(source: str, *, cfg, engine, rank: int) -> Path:
    """Loads pretrained backbone weights (``model.init_from``); the head and optimizers stay fresh."""
    from ..checkpoint import CheckpointError, _strip_module_prefix, _unwrap

    state, meta = _read_init_source(source, cfg.checkpoint.dir)
    b = cfg.backbone
    name, dim = meta.get("backbone"), meta.get("embedding_size")
    if (name is not None and str(name) != b.name) or (dim is not None and int(dim) != b.num_features):
        raise CheckpointError(f"model.init_from = {source!r} holds a {name} backbone with embedding size {dim}; "
                              f"this run builds {b.name} with backbone.num_features = {b.num_features}")
    try:
        _unwrap(engine.module).load_state_dict(_strip_module_prefix(state))
    except RuntimeError as e:
        raise CheckpointError(f"model.init_from = {source!r} does not fit backbone {b.name}: {e}") from e
    engine.weights_loaded()
    if rank == 0:
        log.info("backbone initialised from %s (weights only: fresh head, optimizers and schedule)", Path(source))
    return Path(source)


def start(t) -> None:
    """Resumes trainer ``t`` from a checkpoint (``checkpoint.resume``) or initialises its backbone
    (``model.init_from``)."""
    cfg = t.cfg
    path = None
    if cfg.checkpoint.resume != "none":
        path = choose_checkpoint(cfg, t.ckpt_root, t.head, t.head_opt, t.engine.module, t.rank)
    if path is not None:
        t.state = resume(path, cfg=cfg, engine=t.engine, head=t.head, head_opt=t.head_opt, scaler=t.scaler,
                         world=t.world, samples_per_rank=t.loader.samples_per_rank, rank=t.rank)
        t.resumed_from = t.saver.last_good = path
    elif cfg.model.init_from:
        t.initialized_from = init_from(cfg.model.init_from, cfg=cfg, engine=t.engine, rank=t.rank)

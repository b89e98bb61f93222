"""The training loop: data -> backbone (data-parallel engine) -> Partial FC head -> two optimizers.

One optimizer step, with gradient accumulation over ``A`` micro-steps::

    for each micro-step:  images, labels = next(loader)
                          emb = engine(images)            (autocast)
                          out = head(emb, labels)         (all-gather, sharded softmax, Con, Ali, bank)
                          backward(out["loss"] / A)       (DDP no_sync except on the last micro-step)
    unscale (fp16) -> global grad norm (backbone + all head shards) -> clip -> skip if non-finite
    -> backbone step + head step -> learning rate of the next step

Every value that decides control flow (the loss, the global gradient norm, the stop flag) is the
same on every rank by construction (the head's loss is assembled from all-reduced terms; the
norm is all-reduced), so ranks never diverge: no rank skips a step another one takes.

Determinism: on CPU with a fixed seed, a run stopped after a checkpoint and resumed produces the
same weights as an uninterrupted one (tests/integration/test_train.py): the checkpoint holds the
backbone, head shards, both optimizers, the loss scaler, every RNG, the head's sampler clock and
the data position, and the loaders' order and flips are functions of (seed, epoch, position).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import random
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from partial_fc import PartialFCHead
from partial_fc.distributed import ParallelContext, all_reduce_no_grad

from .dist_env import init_distributed
from .engines import build_engine
from .optimizer_setup import build_optimizer, clip_grads_, global_grad_norm, lr_factor, param_groups

log = logging.getLogger("train.trainer")

__all__ = ["Trainer", "TrainState", "NonFiniteLossError", "EXIT_PREEMPTED"]

# Slots of the step's control flags (summed over ranks with the gradient norm, read once).
_BAD_LOSS, _BAD_LABEL, _BAD_EMB, _STOP = range(4)
_NUM_FLAGS = 4

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

#: Exit status of a run stopped by SIGTERM/SIGUSR1 after it saved a checkpoint (EX_TEMPFAIL):
#: "not finished, resume me". Slurm scripts requeue on it; see docs/launch.md.
EXIT_PREEMPTED = 75


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


@dataclass
class TrainState:
    """Progress counters, saved in every checkpoint.

    Attributes:
        step: Optimizer steps done (the schedule's clock).
        micro_step: Forward/backward passes done.
        epoch: Current epoch.
        position: Samples of ``epoch`` each rank has consumed (a multiple of the batch size).
        skipped_steps: Optimizer steps skipped because of non-finite values.
        consecutive_nonfinite: Skipped steps in a row (reset by a good step, and on resume).
        skipped_saves: Checkpoint saves left out because the step was non-finite (see
            :meth:`Trainer.save`).
    """

    step: int = 0
    micro_step: int = 0
    epoch: int = 0
    position: int = 0
    skipped_steps: int = 0
    consecutive_nonfinite: int = 0
    skipped_saves: int = 0

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


class Trainer:
    """Builds everything from a :class:`train.config.TrainConfig` and runs it.

    The process group is initialised here from the launcher's environment (torchrun or Slurm;
    a plain ``python`` process is a world of one), never at import.

    Args:
        cfg: The configuration (frozen; never modified; the head's class count is taken from the
            dataset with :meth:`TrainConfig.resolve`).
        handle_signals: Install SIGTERM/SIGUSR1 handlers that make the run save a checkpoint at
            the next step boundary and stop (see :data:`EXIT_PREEMPTED`). Only possible from the
            main thread.
    """

    def __init__(self, cfg, *, handle_signals: bool = True) -> None:
        from .config import derive, write_resolved
        from .logging_utils import setup_logging

        self.denv, self.device = init_distributed(cfg.run.device, cfg.distributed.backend,
                                                  cfg.distributed.timeout_s)
        self.ctx = ParallelContext.from_group(None)
        self.rank, self.world = self.ctx.rank, self.ctx.world_size
        self.run_dir = cfg.run_dir
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self._barrier()
        self.log_file = setup_logging(self.run_dir, self.rank)
        self.amp_dtype = _DTYPES[cfg.precision.dtype]
        self._seed_everything(cfg.run.seed)

        self.loader = self._build_loader(cfg)
        self.cfg = cfg = cfg.resolve(int(self.loader.num_classes))
        self.derived = derive(cfg, world_size=self.world, num_samples=int(self.loader.num_samples),
                              cuda_available=self.device.type == "cuda")

        self.backbone = self._build_backbone()
        o = cfg.optimizer
        backbone_opt = build_optimizer(o.name, param_groups(self.backbone, o.weight_decay), o.lr,
                                       o.momentum, o.betas, o.eps)
        self.engine = build_engine(
            cfg.distributed.engine, self.backbone, backbone_opt, device=self.device, world_size=self.world,
            precision=cfg.precision.dtype, zero_stage=cfg.distributed.zero_stage,
            micro_batch=cfg.data.batch_size, grad_accumulation=o.grad_accumulation, grad_clip=o.grad_clip,
            find_unused_parameters=cfg.distributed.find_unused_parameters,
            bucket_cap_mb=cfg.distributed.bucket_cap_mb,
        )
        self.deepspeed = cfg.distributed.engine == "deepspeed"
        class_counts = getattr(self.loader, "class_counts", None)
        self.head = PartialFCHead(cfg.head, class_counts=class_counts, device=self.device)
        # The head's per-step input checks report through device flags that _optimizer_step reads
        # with the gradient norm (one host read per step; docs/training.md, "Host syncs").
        self.head.defer_input_checks = True
        self.head_opt = self._build_head_optimizer()
        fp16 = cfg.precision.dtype == "fp16"
        static = not isinstance(cfg.precision.loss_scale, str)
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=fp16,
            init_scale=float(cfg.precision.loss_scale) if static else cfg.precision.initial_scale,
            # A static scale never grows (and never backs off below the given value in practice:
            # an overflow still skips the step, as it must).
            growth_interval=10**9 if static else cfg.precision.growth_interval,
            growth_factor=1.0 if static else 2.0, backoff_factor=1.0 if static else 0.5,
        )
        self.state = TrainState()
        self.ckpt_root = cfg.checkpoint_dir
        self.resumed_from: Optional[Path] = None
        self.initialized_from: Optional[Path] = None
        #: The newest checkpoint known to hold a finite, resumable state (saved or resumed from).
        self.last_good_checkpoint: Optional[Path] = None
        self._maybe_resume()
        if self.resumed_from is None and cfg.model.init_from:
            self._init_from(cfg.model.init_from)
        # Only now, with the checkpoint (or init_from) accepted: a refused resume leaves the run
        # directory's config.toml/derived.toml as they were (they describe the checkpoints in it).
        if self.rank == 0:
            write_resolved(cfg, self.run_dir, self.derived)
        self.best = _read_best(self.ckpt_root) if cfg.checkpoint.keep_best else None
        self._writer = None
        if cfg.checkpoint.async_save:
            from .checkpoint import AsyncCheckpointWriter

            self._writer = AsyncCheckpointWriter(self.ckpt_root, self.head.ctx, cfg.distributed.timeout_s)
        self._last_saved_step: Optional[int] = None
        self._last_saved_path: Optional[Path] = None
        self.metrics = self._build_metrics()
        self.pair_sets = self._load_pair_sets()
        self._stop_requested = False
        self._stop_signal: Optional[str] = None
        self._step_flags: Optional[torch.Tensor] = None
        self._bad_loss: Optional[torch.Tensor] = None
        self._stop_seen: Optional[bool] = None
        if handle_signals:
            self._install_signal_handlers()

    # ------------------------------------------------------------------------------ building
    def _barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    @staticmethod
    def _seed_everything(seed: int) -> None:
        # The same seed on every rank: the backbone starts identical everywhere (DDP also
        # broadcasts it, DeepSpeed does not check); per-rank streams (head sampling, data order)
        # derive their own seeds from it explicitly.
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def _build_loader(self, cfg):
        from dali_pipelines import build_train_loader

        d = cfg.data
        memory_format = torch.channels_last if cfg.backbone.channels_last else torch.contiguous_format
        common = dict(batch_size=d.batch_size, rank=self.rank, world_size=self.world, seed=cfg.run.seed,
                      shuffle=d.shuffle, flip=d.flip, tail="drop" if d.drop_last else "pad",
                      memory_format=memory_format, strict=d.strict_decode, image_size=d.image_size)
        if d.kind == "synthetic":
            num_classes = cfg.head.num_classes or d.synth.identities
            return build_train_loader("synthetic", None, device=self.device, num_classes=num_classes,
                                      num_samples=d.synth.num_samples, num_workers=0, **common)
        rec = Path(d.train_rec)
        if not rec.is_file():
            raise FileNotFoundError(
                f"data.train_rec = {str(rec)!r} does not exist. For the generated demo data set run "
                f"`pfc synth --config <recipe>` first (it writes {d.synth.train_rec}), or point "
                "data.train_rec at your .rec (its .idx next to it)"
            )
        # DALI's CPU decode delivers CPU tensors; they are copied to the training device below.
        device = self.device
        if d.kind == "dali" and d.dali_decode == "cpu":
            device = torch.device("cpu")
        workers = d.dali_threads if d.kind == "dali" else d.num_workers
        return build_train_loader(d.kind, rec, device=device, num_workers=workers,
                                  num_classes=cfg.head.num_classes, **common)

    def _build_backbone(self) -> torch.nn.Module:
        from partial_fc.backbones import build_backbone

        b = self.cfg.backbone
        # input_size only when not the default 112, so backbones without the option still build.
        size = {"input_size": self.cfg.data.image_size} if self.cfg.data.image_size != 112 else {}
        model = build_backbone(b.name, num_features=b.num_features, dropout=b.dropout, **size).to(self.device)
        if b.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if b.compile:
            model = torch.compile(model)
        return model

    def _build_head_optimizer(self) -> torch.optim.Optimizer:
        o, d = self.cfg.optimizer, self.derived
        groups = [{"params": [self.head.weight], "weight_decay": d.head_weight_decay}]
        if self.head.log_tau is not None:
            groups.append({"params": [self.head.log_tau], "weight_decay": 0.0})
        # head.row_update="lazy": row optimizers that touch only the sampled rows (partial_fc.optim).
        return build_optimizer(o.name, groups, d.head_lr, o.momentum, o.betas, o.eps, rows=self.cfg.head.row_update)

    def _build_metrics(self):
        from .metrics import MetricsHub

        m = self.cfg.metrics
        return MetricsHub(
            rank=self.rank, local_rank=self.denv.local_rank, world_size=self.world, run_dir=self.run_dir,
            prometheus=m.prometheus, host=m.host, port=m.port, per_rank=m.per_rank,
            tensorboard=m.tensorboard, progress=m.progress_bar, total_steps=self.derived.total_steps,
            device=self.device, initial_step=self.state.step,
        )

    def _load_pair_sets(self) -> list:
        if self.rank != 0 or not self.cfg.evaluation.bin_files:
            return []
        from .evaluate.runner import load_pair_set

        return [load_pair_set(p, image_size=self.cfg.data.image_size) for p in self.cfg.evaluation.bin_files]

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, _frame):
            # Only a flag: the checkpoint is written at the next step boundary, collectively.
            self._stop_requested = True
            self._stop_signal = signal.Signals(signum).name

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, handler)

    # ------------------------------------------------------------------------------ checkpoints
    @property
    def _backbone_optimizer_for_checkpoint(self):
        # A plain torch optimizer, or under ZeRO-1/2 a view that gathers the partitioned state by
        # parameter name on save (collective) and scatters it on load (train/engines.py).
        return self.engine.checkpoint_optimizer

    def _choose_checkpoint(self) -> Optional[Path]:
        """The checkpoint to resume from (checked against this job), or ``None`` for a fresh start.

        ``resume = "auto"``/``"auto-or-fresh"`` try the checkpoints newest first and fall back
        from a damaged, non-finite or incompatible one to the newest that passes
        :func:`check_checkpoint`, with a warning in the run log naming both. When none passes,
        ``"auto"`` is an error and ``"auto-or-fresh"`` starts from step 0. An explicit path must
        pass. Collective.
        """
        from .checkpoint import CheckpointError, check_checkpoint, list_checkpoints

        resume = self.cfg.checkpoint.resume

        def check(path: Path) -> None:
            check_checkpoint(path, self.head, self.head_opt, backbone=self.engine.module)

        if resume not in ("auto", "auto-or-fresh"):
            check(Path(resume))
            return Path(resume)
        rejected: list[tuple[Path, str]] = []
        for path in list_checkpoints(self.ckpt_root):
            try:
                check(path)
            except CheckpointError as e:
                rejected.append((path, str(e)))
                if self.rank == 0:
                    log.warning("checkpoint %s cannot be resumed from: %s", path, e)
                continue
            if rejected and self.rank == 0:
                log.warning("auto-resume falls back from %s (the newest checkpoint; damaged or incompatible) to %s",
                            rejected[0][0], path)
            return path
        if not rejected:
            return None
        listing = "; ".join(f"{p.name}: {e}" for p, e in rejected)
        if resume == "auto":
            raise CheckpointError(
                f"no valid checkpoint in {self.ckpt_root} to resume from ({listing}). Repair or move them away, "
                'or set checkpoint.resume = "auto-or-fresh" to start from step 0 (its saves then replace those '
                "step directories)"
            )
        if self.rank == 0:
            log.warning('checkpoint.resume = "auto-or-fresh": no valid checkpoint in %s (%d rejected); starting '
                        "from step 0", self.ckpt_root, len(rejected))
        return None

    def _optimizer_hyperparameters(self) -> list[list[dict]]:
        """The configured param-group settings (base_lr, weight decay, momentum...) of both optimizers."""
        return [[{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
                for opt in (self.engine.optimizer, self.head_opt)]

    def _apply_optimizer_hyperparameters(self, configured: list[list[dict]]) -> None:
        """Puts the configured settings back after a checkpoint restored its saved param groups.

        The config decides the hyperparameters of a resumed run (so a rerun with a lower
        optimizer.lr after a divergence really is one); the checkpoint gives the state (momenta,
        moments, step counts). With an unchanged config this changes nothing.
        """
        for opt, groups in zip((self.engine.optimizer, self.head_opt), configured):
            for g, want in zip(opt.param_groups, groups):
                changed = sorted(k for k, v in want.items() if k != "lr" and str(g.get(k)) != str(v))
                if changed and self.rank == 0:
                    log.warning("resume: %s param group settings %s come from the config, not the checkpoint "
                                "(%s -> %s)", type(opt).__name__, changed, [g.get(k) for k in changed],
                                [want[k] for k in changed])
                g.update(want)

    def _maybe_resume(self) -> None:
        from .checkpoint import load_checkpoint

        if self.cfg.checkpoint.resume == "none":
            return
        path = self._choose_checkpoint()
        if path is None:
            return
        configured = self._optimizer_hyperparameters()
        extra = load_checkpoint(path, self.head, self.head_opt, backbone=self.engine.module,
                                backbone_optimizer=self._backbone_optimizer_for_checkpoint,
                                scaler=self.scaler if self.scaler.is_enabled() else None,
                                verify=False)  # hashed by check_checkpoint just before
        self.engine.weights_loaded()  # ZeRO: its fp32 master copy follows the loaded weights
        self._apply_optimizer_hyperparameters(configured)
        st = TrainState(**extra["train_state"])
        # A fresh count: the checkpoint holds a finite state, and a count restored from before the
        # save would stop a resumed run (e.g. one lowering optimizer.lr after a divergence) at once.
        st.consecutive_nonfinite = 0
        saved_world, saved_batch = int(extra.get("world_size", self.world)), int(extra.get("batch_size", 0))
        if (saved_world, saved_batch) != (self.world, self.cfg.data.batch_size):
            # The epoch order is one global permutation that rank r reads with stride world_size,
            # so the samples already consumed are its first position * world_size entries whatever
            # the world size: resume at that global offset (rounded down to a whole global batch).
            consumed = int(extra.get("global_position", st.position * saved_world))
            gb = self.cfg.data.batch_size * self.world
            st.position = min((consumed // gb) * self.cfg.data.batch_size, self.loader.samples_per_rank)
            log.warning("resuming a checkpoint of %d rank(s) x batch %d on %d rank(s) x batch %d: data "
                        "position %d of epoch %d maps to %d per rank", saved_world, saved_batch, self.world,
                        self.cfg.data.batch_size, consumed, st.epoch, st.position)
        self.state = st
        self.resumed_from = self.last_good_checkpoint = path
        if self.rank == 0:
            log.info("resumed from %s at step %d (epoch %d, position %d per rank)", path, st.step, st.epoch,
                     st.position)

    def _init_from(self, source: str) -> None:
        """Loads pretrained backbone weights (``model.init_from``); the head and optimizers stay fresh."""
        from .checkpoint import CheckpointError, load_backbone_and_extra

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
            state, meta = payload["state_dict"], dict(payload.get("metadata") or {})
        elif path.is_dir():
            root = path / self.cfg.checkpoint.dir if (path / self.cfg.checkpoint.dir).is_dir() else path
            state, meta = load_backbone_and_extra(root)  # a checkpoint, a checkpoint root or a run directory
        else:
            raise CheckpointError(f"model.init_from = {source!r} does not exist")
        b = self.cfg.backbone
        name, dim = meta.get("backbone"), meta.get("embedding_size")
        if (name is not None and str(name) != b.name) or (dim is not None and int(dim) != b.num_features):
            raise CheckpointError(f"model.init_from = {source!r} holds a {name} backbone with embedding size {dim}; "
                                  f"this run builds {b.name} with backbone.num_features = {b.num_features}")
        from .checkpoint import _strip_module_prefix, _unwrap

        try:
            _unwrap(self.engine.module).load_state_dict(_strip_module_prefix(state))
        except RuntimeError as e:
            raise CheckpointError(f"model.init_from = {source!r} does not fit backbone {b.name}: {e}") from e
        self.engine.weights_loaded()
        self.initialized_from = path
        if self.rank == 0:
            log.info("backbone initialised from %s (weights only: fresh head, optimizers and schedule)", path)

    def _update_best(self, results: dict[str, dict]) -> None:
        """``checkpoint.keep_best``: after an evaluation, keeps this step's checkpoint as ``best``
        when the figure improved. Collective (rank 0 evaluates, every rank learns the figure)."""
        key = self.cfg.checkpoint.keep_best
        value = float("nan")
        if self.rank == 0:
            value = _lookup_eval(results, key)
        if self.world > 1:
            t = torch.tensor([value], dtype=torch.float64, device=self.device)
            dist.broadcast(t, src=0)
            value = float(t.item())  # an evaluation step: not an ordinary step
        if not math.isfinite(value):
            return
        better = (self.best is None or (value > self.best["value"] if self.cfg.checkpoint.keep_best_mode == "max"
                                        else value < self.best["value"]))
        if not better:
            return
        if self._last_saved_step == self.state.step:
            self.wait_for_checkpoint()
            path = self._last_saved_path
        else:
            path = self.save(wait=True)
        if path is None:  # the state was not finite: nothing to keep
            return
        self.best = {"metric": key, "value": value, "step": self.state.step, "source": path.name}
        if self.rank == 0:
            from .checkpoint import keep_as_best

            keep_as_best(path, self.ckpt_root, self.best)
            log.info("best %s = %.6g at step %d: kept as %s", key, value, self.state.step, self.ckpt_root / "best")
        self._barrier()

    def wait_for_checkpoint(self) -> None:
        """Completes an asynchronous save in progress (collective; a no-op when there is none)."""
        if self._writer is not None:
            self._writer.wait()

    def _norm_stat_buffers(self) -> list[torch.Tensor]:
        """Running statistics of the backbone's BatchNorm layers (what a forward in train mode changes)."""
        bufs = []
        for m in self.engine.module.modules():
            if isinstance(m, torch.nn.modules.batchnorm._NormBase) and m.track_running_stats:
                bufs += [b for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
        return bufs

    def _snapshot_norm_stats(self) -> list[torch.Tensor]:
        """Copies the BatchNorm statistics before a step's first forward.

        Cheap: vectors only, into buffers allocated once, with one multi-tensor copy (no host
        sync). Returns the snapshot for :meth:`_restore_norm_stats`.
        """
        bufs = self._norm_stat_buffers()
        snap = getattr(self, "_norm_snapshot", None)
        if snap is None or len(snap) != len(bufs) or any(a.shape != b.shape for a, b in zip(snap, bufs)):
            snap = self._norm_snapshot = [torch.empty_like(b) for b in bufs]
        if bufs:
            with torch.no_grad():
                torch._foreach_copy_(snap, bufs)
        return snap

    def _restore_norm_stats(self, snapshot: list[torch.Tensor]) -> None:
        """Undoes a skipped step's forward passes: their (NaN) batch statistics must not stay."""
        bufs = self._norm_stat_buffers()
        if bufs:
            with torch.no_grad():
                torch._foreach_copy_(bufs, snapshot)

    def _state_is_finite(self) -> bool:
        """Whether every floating tensor of the state a checkpoint holds is finite, on every rank."""
        tensors = list(self.engine.module.state_dict().values()) + list(self.head.state_dict().values())
        for opt in (self.head_opt, self.engine.optimizer):
            if opt is not None:
                # getattr: an engine's optimizer wrapper may keep its state elsewhere (then unchecked).
                tensors += [v for st in getattr(opt, "state", {}).values() for v in st.values()
                            if isinstance(v, torch.Tensor)]
        # One fp32 sum per tensor instead of isfinite(t): NaN and inf propagate through a sum, and
        # no temporary as large as the tensor is made (the head shard can be gigabytes). A finite
        # tensor whose sum overflows fp32 (entries ~1e30) is garbage anyway and is refused too.
        sums = []
        for t in tensors:
            if t.is_sparse:
                t = t.coalesce().values()
            if t.is_floating_point() and t.numel():
                sums.append(t.detach().sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)
                            .to(torch.float64))
        ok = torch.isfinite(torch.stack(sums)).all().to(self.device, torch.float32).reshape(1) if sums else \
            torch.ones(1, device=self.device)
        return bool(all_reduce_no_grad(ok, self.ctx, op=dist.ReduceOp.MIN).item() > 0)

    def save(self, wait: bool = False) -> Optional[Path]:
        """Writes a checkpoint of the current step (collective: every rank calls it).

        Never saves what a resume should not start from: while the latest step was skipped as
        non-finite, or when any tensor of the state is not finite, the save is left out (counted
        in ``skipped_saves``, logged) and ``None`` returned, so retention keeps the last good one.

        With ``checkpoint.async_save`` the call returns once the state is staged (copied to host
        memory) and a thread writes it; ``wait=True`` (or :meth:`wait_for_checkpoint`) completes it.
        """
        from .checkpoint import save_checkpoint

        why = None
        if self.state.consecutive_nonfinite > 0:
            why = f"the last {self.state.consecutive_nonfinite} step(s) were non-finite"
        elif not self._state_is_finite():
            why = "the model, head or optimizer state holds non-finite values"
        if why is not None:
            self.state.skipped_saves += 1
            if self.rank == 0:
                log.warning("checkpoint of step %d not written: %s; the last good checkpoint is %s",
                            self.state.step, why, self.last_good_checkpoint or "none (nothing saved yet)")
            return None

        extra = {
            "train_state": self.state.to_dict(),
            "world_size": self.world,
            "batch_size": self.cfg.data.batch_size,
            "global_position": self.state.position * self.world,
            "backbone": self.cfg.backbone.name,
            "embedding_size": self.cfg.backbone.num_features,
        }
        bopt = self._backbone_optimizer_for_checkpoint
        if bopt.collective:  # ZeRO: every rank takes part in gathering the state
            bopt = bopt.state_dict()
        kwargs = dict(backbone=self.engine.module, backbone_optimizer=bopt,
                      scaler=self.scaler if self.scaler.is_enabled() else None, extra_state=extra,
                      keep_last=self.cfg.checkpoint.keep_last or None, finite=True)
        if self._writer is not None:
            path = self._writer.save(self.state.step, self.head, self.head_opt, **kwargs)
            if self.rank == 0:
                log.info("checkpoint step %d -> %s (staged in %.3f s, writing in the background)", self.state.step,
                         path, self._writer.last_stall_s)
            if wait:
                self._writer.wait()
        else:
            path = save_checkpoint(self.ckpt_root, self.state.step, self.head, self.head_opt, **kwargs)
            if self.rank == 0:
                log.info("checkpoint step %d -> %s", self.state.step, path)
        self.last_good_checkpoint = path
        self._last_saved_step, self._last_saved_path = self.state.step, path
        return path

    # ------------------------------------------------------------------------------ one step
    def _set_lr(self) -> dict[str, float]:
        s, d = self.cfg.schedule, self.derived
        f = lr_factor(self.state.step, d.total_steps, d.warmup_steps, s.decay, s.power, s.min_lr_ratio)
        lrs = {}
        for name, opt in (("backbone", self.engine.optimizer), ("head", self.head_opt)):
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * f
            lrs[name] = opt.param_groups[0]["lr"]
        return lrs

    def _zero_grads(self) -> None:
        self.engine.zero_grad()
        self.head_opt.zero_grad(set_to_none=True)

    def _deepspeed_null_step(self) -> None:
        """Lets DeepSpeed pass its step boundary without changing the backbone.

        DeepSpeed owns the backbone's step and counts micro-steps itself, so a skipped step
        cannot simply not call it: the step runs on zero gradients with learning rate 0
        (parameters unchanged; SGD momentum / Adam moments see one zero-gradient step).
        """
        opt = self.engine.optimizer
        saved = [g["lr"] for g in opt.param_groups]
        for g in opt.param_groups:
            g["lr"] = 0.0
        self.engine.step()
        for g, lr in zip(opt.param_groups, saved):
            g["lr"] = lr

    def _optimizer_step(self) -> tuple[bool, float, str]:
        """Unscale, global norm, clip, then step both optimizers or neither.

        The step's control values (the norm, a non-finite loss, bad input, a stop request) travel
        in the norm's all-reduce and reach the host in one read: the only device sync of an
        ordinary step (docs/training.md, "Host syncs").

        Returns:
            ``(stepped, norm, why)``; ``why`` says what was non-finite when not stepped.
        """
        o = self.cfg.optimizer
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.engine.optimizer)
            self.scaler.unscale_(self.head_opt)
        flags = torch.zeros(_NUM_FLAGS, device=self.device)
        if self._step_flags is not None:
            flags[:3] = self._step_flags.float()
        flags[_STOP] = 1.0 if self._stop_requested else 0.0
        if self.engine.replicated_grads:
            norm, flags = global_grad_norm(self.engine.module.parameters(), [self.head.weight], self.ctx,
                                           self.device, flags=flags)
        else:  # ZeRO-partitioned gradients: DeepSpeed clips the backbone, the head by its own norm
            norm, flags = global_grad_norm([], [self.head.weight], self.ctx, self.device, flags=flags)
        if self.head.log_tau is not None and self.head.log_tau.grad is not None:
            # log_tau is replicated and its gradient identical on every rank: counted once.
            norm = torch.sqrt(norm**2 + self.head.log_tau.grad.detach().float().pow(2).sum())
        verdict = torch.cat([norm.reshape(1).float(), flags]).tolist()  # THE host read of the step
        norm_f, flags_f = verdict[0], verdict[1:]
        self._stop_seen = flags_f[_STOP] > 0
        why = f"gradient norm is {norm_f}"
        if flags_f[_BAD_LABEL] > 0:
            raise self.head.input_error() or ValueError(
                f"a label outside [0, {self.cfg.head.num_classes}) in step {self.state.step + 1}: check the "
                "dataset's class count against head.num_classes")
        if flags_f[_BAD_EMB] > 0:
            why = str(self.head.input_error() or "non-finite embeddings")
        elif flags_f[_BAD_LOSS] > 0:
            why = f"loss is {float(self._bad_loss)}" if self._bad_loss is not None else "loss is not finite"
        finite = math.isfinite(norm_f) and flags_f[_BAD_EMB] == 0 and flags_f[_BAD_LOSS] == 0
        if finite and o.grad_clip > 0:
            params = [p for p in self.head.parameters() if p.grad is not None]
            if not self.engine.clips_own_grads:
                params += list(self.engine.module.parameters())
            clip_grads_(params, norm, o.grad_clip)
        if finite:
            if self.scaler.is_enabled():
                self.scaler.step(self.engine.optimizer)
                self.scaler.step(self.head_opt)
            else:
                self.engine.step()
                self.head_opt.step()
        elif self.deepspeed:
            self.engine.optimizer.zero_grad()
            self._deepspeed_null_step()
        if self.scaler.is_enabled():
            self.scaler.update()
        self._zero_grads()
        return finite, norm_f, why

    def _note_nonfinite(self, why: str) -> None:
        self.state.skipped_steps += 1
        self.state.consecutive_nonfinite += 1
        self.metrics.inc_skipped_steps()
        if self.rank == 0:
            log.warning("step %d skipped: %s (%d in a row)", self.state.step, why,
                        self.state.consecutive_nonfinite)
        limit = self.cfg.run.max_nonfinite_steps
        if self.state.consecutive_nonfinite >= limit:
            raise NonFiniteLossError(
                f"{self.state.consecutive_nonfinite} consecutive steps with non-finite values (limit "
                f"run.max_nonfinite_steps = {limit}); last: {why}. Lower optimizer.lr, set "
                "optimizer.grad_clip, use bf16 instead of fp16, or check the data; "
                + self._last_good_hint()
            )

    def _last_good_hint(self) -> str:
        """Where to resume from after a divergence: a checkpoint that exists (retention keeps it)."""
        path = self.last_good_checkpoint
        if path is not None and (path / "manifest.json").is_file():
            return (f"the last good checkpoint is {path}: a rerun resumes from it (checkpoint.resume = \"auto\") "
                    "with a fresh non-finite count")
        return "no checkpoint was saved before the run diverged"

    def _micro_step(self, images: torch.Tensor, labels: torch.Tensor, last: bool, timer) -> Optional[dict]:
        """Forward and backward of one micro-batch; ``None`` when its loss is not finite."""
        accum = self.cfg.optimizer.grad_accumulation
        # DeepSpeed synchronises at its own accumulation boundary; DDP needs no_sync() to skip it.
        sync = contextlib.nullcontext() if (last or self.deepspeed) else self.engine.no_sync()
        with sync:
            with timer.phase("forward"):
                with torch.autocast(self.device.type, dtype=self.amp_dtype,
                                    enabled=self.amp_dtype != torch.float32):
                    emb = self.engine(images)
                    try:
                        out = self.head(emb, labels)
                    except FloatingPointError as e:  # non-finite embeddings: raised on every rank
                        out, why = None, str(e)
                if out is not None:
                    loss = out["loss"]
                    # No host read here: a non-finite loss (the same on every rank) or bad input is
                    # a device flag that _optimizer_step reads with the norm, and the step is then
                    # skipped on every rank (its NaN gradients are dropped).
                    bad = torch.stack([~torch.isfinite(loss.detach()),
                                       *(self.head.input_flags if self.head.input_flags is not None
                                         else torch.zeros(2, dtype=torch.bool, device=loss.device))])
                    first = self._step_flags is None
                    self._step_flags = bad if first else self._step_flags | bad
                    # A non-finite loss of this step, for the message (read only when skipping).
                    self._bad_loss = loss.detach() if first else torch.where(bad[0], loss.detach(), self._bad_loss)
                    if self.deepspeed and not bool(torch.isfinite(loss.detach())):
                        # DeepSpeed reduces and partitions gradients inside its backward, where a
                        # NaN could not be dropped again: its loss is read here (one read per
                        # micro-step under DeepSpeed, docs/training.md) and the backward skipped.
                        out, why = None, f"loss is {float(loss.detach())}"
            with timer.phase("backward"):
                if out is None:
                    if self.deepspeed:  # keep DeepSpeed's micro-step count (see _deepspeed_null_step)
                        zero = sum(p.sum() * 0.0 for p in self.engine.module.parameters())
                        self.engine.backward(zero)
                        if not last:
                            self.engine.step()
                    self._pending_nonfinite = why
                    return None
                if self.deepspeed:
                    self.engine.backward(loss)  # DeepSpeed divides by its accumulation steps itself
                    if not last:
                        self.engine.step()  # a no-op for DeepSpeed until its boundary
                else:
                    self.scaler.scale(loss / accum).backward()
        return out

    # ------------------------------------------------------------------------------ the loop
    def _stop_agreed(self) -> bool:
        """Whether any rank received a stop signal, as of this step's optimizer step.

        The request rides on the gradient norm's all-reduce (``_optimizer_step``); a step dropped
        before it (a non-finite micro-step under accumulation) asks with its own collective.
        """
        if self._stop_seen is not None:
            seen, self._stop_seen = self._stop_seen, None
            return seen
        flag = torch.tensor([1.0 if self._stop_requested else 0.0], device=self.device)
        flag = all_reduce_no_grad(flag, self.ctx, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def fit(self, on_step: Optional[Callable[[int, int], None]] = None) -> dict[str, Any]:
        """Trains until ``derived.total_steps`` optimizer steps (or a stop signal).

        Args:
            on_step: Called as ``on_step(step, images)`` after every optimizer step, with the
                step number and the images this rank consumed in it (benchmarks time steps with it).

        Returns:
            A summary dict (run directory, steps, skipped steps, final losses, evaluation,
            ``"preempted"`` when stopped by a signal).
        """
        from .metrics import StepTimer

        cfg, d = self.cfg, self.derived
        accum = cfg.optimizer.grad_accumulation
        timer = StepTimer(self.device)
        self.engine.train(True)
        self.head.train(True)
        if self.rank == 0:
            log.info("training %s: %d optimizer steps (%d micro-steps per epoch), global batch %d, %d rank(s), "
                     "%s, %s engine, %s, head %s on %d classes", cfg.run.name, d.total_steps, d.steps_per_epoch,
                     d.global_batch, self.world, self.device, cfg.distributed.engine, cfg.precision.dtype,
                     cfg.head.method, cfg.head.num_classes)
        summary: dict[str, Any] = {"run_dir": str(self.run_dir), "preempted": False,
                                   "resumed_from": str(self.resumed_from) if self.resumed_from else None}
        window_images, window_t0 = 0, time.perf_counter()
        micro_in_step = step_images = 0
        last_out: Optional[dict] = None
        bad_in_step: Optional[str] = None
        self._pending_nonfinite = None
        self._step_flags: Optional[torch.Tensor] = None  # [non-finite loss, bad label, bad embedding]
        self._bad_loss: Optional[torch.Tensor] = None
        self._stop_seen: Optional[bool] = None
        self._set_lr()  # the schedule's value at the (possibly resumed) first step
        t_start = time.perf_counter()
        while self.state.step < d.total_steps:
            self.loader.set_epoch(self.state.epoch, self.state.position)
            it = iter(self.loader)
            epoch_done = False
            while self.state.step < d.total_steps:
                with timer.phase("data"):
                    batch = next(it, None)
                    if batch is not None:
                        images = batch[0].to(self.device, non_blocking=True)
                        labels = batch[1].to(self.device, non_blocking=True)
                if batch is None:
                    epoch_done = True
                    break
                if micro_in_step == 0:
                    norm_stats = self._snapshot_norm_stats()
                if images.shape[0] != cfg.data.batch_size:
                    # The head's all-gathers need equal batches on every rank; the loaders pad or
                    # drop the tail, so this is a host-side shape check (the head's own collective
                    # check is off, see PartialFCHead.defer_input_checks).
                    raise ValueError(f"the loader delivered a batch of {images.shape[0]} images, "
                                     f"data.batch_size is {cfg.data.batch_size}")
                micro_in_step += 1
                last = micro_in_step == accum
                out = self._micro_step(images, labels, last, timer)
                self.state.micro_step += 1
                self.state.position += images.shape[0]
                window_images += images.shape[0]
                step_images += images.shape[0]
                if out is None:
                    bad_in_step = self._pending_nonfinite
                else:
                    last_out = out
                if not last:
                    continue
                micro_in_step = 0
                with timer.phase("optimizer"):
                    if bad_in_step is not None:  # drop the whole accumulated step
                        if self.deepspeed:
                            self._deepspeed_null_step()
                        self._zero_grads()
                        stepped, norm = False, float("nan")
                        why = bad_in_step
                    else:
                        stepped, norm, why = self._optimizer_step()
                bad_in_step = None
                self._step_flags = self._bad_loss = None
                self.state.step += 1
                if on_step is not None:
                    on_step(self.state.step, step_images)
                step_images = 0
                if stepped:
                    self.state.consecutive_nonfinite = 0
                else:
                    self._restore_norm_stats(norm_stats)
                    self._note_nonfinite(why)
                lrs = self._set_lr()  # the learning rate of the next step
                if self.state.step % cfg.run.log_every == 0 or self.state.step == d.total_steps:
                    self._report(last_out, lrs, norm, timer, window_images, window_t0)
                    window_images, window_t0 = 0, time.perf_counter()
                else:
                    timer.reset()  # drops this step's phase times without reading the device
                if cfg.checkpoint.every_steps and self.state.step % cfg.checkpoint.every_steps == 0 \
                        and self.state.step < d.total_steps:
                    self.save()
                if cfg.evaluation.every_steps and self.state.step % cfg.evaluation.every_steps == 0 \
                        and self.state.step < d.total_steps:
                    self.evaluate()
                if self._stop_agreed():
                    summary["preempted"] = True
                    break
            if summary["preempted"]:
                break
            if epoch_done:
                self.state.epoch += 1
                self.state.position = 0
        self.save()
        self.wait_for_checkpoint()  # complete before evaluating, exporting or exiting (75 after a signal)
        summary["train_seconds"] = round(time.perf_counter() - t_start, 2)
        if summary["preempted"]:
            if self.rank == 0:
                log.warning("stopped by %s at step %d/%d; run again to resume from %s",
                            self._stop_signal or "a signal on another rank", self.state.step, d.total_steps,
                            self.last_good_checkpoint or "step 0 (no checkpoint was saved)")
        else:
            summary["eval"] = self.evaluate()
        summary["step"] = self.state.step
        summary["total_steps"] = d.total_steps
        summary["skipped_steps"] = self.state.skipped_steps
        summary["skipped_saves"] = self.state.skipped_saves
        summary["checkpoint"] = str(self.last_good_checkpoint) if self.last_good_checkpoint else None
        summary["skipped_records"] = int(getattr(self.loader, "skipped", 0))
        if last_out is not None:
            summary["final_loss"] = {k: float(v.detach()) for k, v in last_out.items()}
        summary["metrics_url"] = self.metrics.url
        if self.initialized_from is not None:
            summary["initialized_from"] = str(self.initialized_from)
        if self.best is not None:
            summary["best"] = {**self.best, "path": str(self.ckpt_root / "best")}
        return summary

    def _report(self, out, lrs, norm, timer, window_images: int, window_t0: float) -> None:
        elapsed = max(time.perf_counter() - window_t0, 1e-9)
        ips = window_images / elapsed  # this rank's throughput
        timings = timer.collect()
        losses = {k: float(v.detach()) for k, v in out.items()} if out is not None else {}
        self.metrics.update(
            step=self.state.step, epoch=self.state.epoch, losses=losses, lr=lrs, timings=timings,
            images_per_s=ips, grad_norm=norm,
            loss_scale=self.scaler.get_scale() if self.scaler.is_enabled() else 1.0,
            head_stats=self.head.last_stats, skipped_records=int(getattr(self.loader, "skipped", 0)),
            consecutive_nonfinite=self.state.consecutive_nonfinite,
        )
        if self.rank == 0 and losses:
            log.info("step %d/%d epoch %d loss %.4f (ce %.4f con %.4f ali %.4f) lr %.4g %.0f img/s/rank "
                     "grad-norm %.3f", self.state.step, self.derived.total_steps, self.state.epoch,
                     losses["loss"], losses["ce"], losses["con"], losses["ali"], lrs["backbone"], ips, norm)

    # ------------------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict[str, dict]:
        """Rank 0 evaluates every pair set; the other ranks wait. Returns ``{set: figures}``."""
        results: dict[str, dict] = {}
        if self.rank == 0 and self.pair_sets:
            from .evaluate.runner import evaluate_pair_set

            e = self.cfg.evaluation
            module = self.engine.module
            was_training = module.training
            module.eval()
            try:
                for ps in self.pair_sets:
                    with torch.autocast(self.device.type, dtype=self.amp_dtype,
                                        enabled=self.amp_dtype != torch.float32):
                        r = evaluate_pair_set(module, ps, self.device, e.batch_size, e.flip_test,
                                              e.far_targets, folds=e.folds)
                    log.info("eval step %d %s", self.state.step, r.summary())
                    tar = {f"{k:g}": v for k, v in r.tar.items()}
                    results[r.name] = {"accuracy": r.accuracy, "accuracy_std": r.accuracy_std,
                                       "threshold": r.threshold, "tar": tar, "step": self.state.step}
                    self.metrics.record_eval(r.name, {"accuracy": r.accuracy, "tar": dict(r.tar)},
                                             step=self.state.step)
            finally:
                module.train(was_training)
        self._barrier()
        if self.cfg.checkpoint.keep_best:
            self._update_best(results)
        return results

    def export(self) -> dict[str, Any]:
        """Rank 0 writes the backbone (state dict, and ONNX when enabled) and checks ONNX parity."""
        out: dict[str, Any] = {}
        if self.rank == 0:
            from .export import check_onnx, export_onnx, export_state_dict

            x = self.cfg.export
            meta = {"backbone": self.cfg.backbone.name, "embedding_size": self.cfg.backbone.num_features,
                    "step": self.state.step}
            export_dir = self.run_dir / "export"
            out["state_dict"] = str(export_state_dict(self.engine.module, export_dir / "backbone.pt", meta))
            if x.onnx:
                path = export_onnx(self.engine.module, export_dir / x.output_name,
                                   embedding_size=self.cfg.backbone.num_features,
                                   backbone_name=self.cfg.backbone.name, opset=x.opset,
                                   image_size=self.cfg.data.image_size)
                out["onnx"] = str(path)
                out["onnx_max_abs_diff"] = check_onnx(self.engine.module, path, batch=5,
                                                      image_size=self.cfg.data.image_size)
                log.info("ONNX %s: max |onnxruntime - torch| = %.2e at batch 5", path, out["onnx_max_abs_diff"])
        self._barrier()
        return out

    def close(self) -> None:
        """Completes a checkpoint still being written, stops the metrics endpoint and leaves the
        process group."""
        if self._writer is not None:
            # Local only: on an error path another rank may be gone; rank 0 still commits when
            # every rank's files arrived, else the previous checkpoint stays the newest.
            self._writer.wait(collective=False)
        self.metrics.close()
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _read_best(ckpt_root: Path) -> Optional[dict]:
    from .checkpoint import read_best

    return read_best(ckpt_root)


def _lookup_eval(results: dict, key: str) -> float:
    """The figure ``"<pair set>/<figure>[/<sub>]"`` of an evaluation (``nan`` when not evaluated).

    Raises:
        ValueError: The key names nothing in the results (the message lists what there is).
    """
    node: Any = results
    for part in key.split("/"):
        if isinstance(node, dict) and part in node:
            node = node[part]
            continue
        if isinstance(node, dict):  # numeric keys such as FAR targets: 1e-4 == 0.0001
            try:
                match = [k for k in node if float(k) == float(part)]
            except ValueError:
                match = []
            if match:
                node = node[match[0]]
                continue
        if not results:
            return float("nan")

        def keys(d, prefix=""):
            for k, v in d.items():
                if isinstance(v, dict):
                    yield from keys(v, f"{prefix}{k}/")
                elif isinstance(v, (int, float)):
                    yield f"{prefix}{k}"

        raise ValueError(f"checkpoint.keep_best = {key!r} is not an evaluation figure; there are: "
                         + ", ".join(keys(results)))
    if not isinstance(node, (int, float)):
        raise ValueError(f"checkpoint.keep_best = {key!r} names a group, not a number")
    return float(node)


def run_training(cfg, *, export: bool = True) -> dict[str, Any]:
    """Builds a :class:`Trainer`, trains, exports (rank 0) and writes ``summary.json``.

    Returns:
        The summary (also on ranks other than 0, without the export paths).
    """
    trainer = Trainer(cfg)
    try:
        summary = trainer.fit()
        if export and not summary["preempted"]:
            summary["export"] = trainer.export()
        if trainer.rank == 0:
            (trainer.run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    finally:
        trainer.close()
    return summary

"""The training loop: data -> backbone (data-parallel engine) -> Partial FC head -> two optimizers.

One optimizer step, with gradient accumulation over ``A`` micro-steps::

    for each micro-step:  images, labels = next(loader)
                          emb = engine(images)            (autocast)
                          out = head(emb, labels)         (all-gather, sharded softmax, Con, Ali, bank)
                          backward(out["loss"] / A)       (DDP no_sync except on the last micro-step)
    unscale (fp16) -> global grad norm (backbone + all head shards) -> clip -> skip if non-finite
    -> backbone step + head step -> lr schedule

Everything that can differ between ranks and would make one rank skip while another steps (the
loss, the global gradient norm) is the same value on every rank by construction, so ranks never
diverge in control flow.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from partial_fc import PartialFCHead
from partial_fc.distributed import ParallelContext, all_reduce_no_grad

from .dist_env import init_distributed
from .engines import build_engine
from .optim import build_optimizer, clip_grads_, global_grad_norm, lr_factor, param_groups

log = logging.getLogger("partial_fc.train")

__all__ = ["Trainer", "TrainState", "NonFiniteLossError"]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


@dataclass
class TrainState:
    """Progress counters, saved in every checkpoint.

    Attributes:
        step: Optimizer steps done (the schedule's clock).
        micro_step: Forward/backward passes done (the head's sampler clock).
        epoch: Current epoch.
        position: Samples of ``epoch`` this rank has consumed (multiple of the batch size).
        skipped_steps: Optimizer steps skipped because of non-finite values.
        consecutive_nonfinite: Skipped steps in a row (reset by a good step).
    """

    step: int = 0
    micro_step: int = 0
    epoch: int = 0
    position: int = 0
    skipped_steps: int = 0
    consecutive_nonfinite: int = 0

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


class _Timer:
    """Per-phase wall time; synchronises CUDA so asynchronous kernels are charged to their phase."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times[phase] = self.times.get(phase, 0.0) + time.perf_counter() - t0

    def pop(self) -> dict[str, float]:
        t, self.times = self.times, {}
        return t


class Trainer:
    """Builds everything from a resolved :class:`train.config.TrainConfig` and runs it.

    Args:
        cfg: The configuration (frozen; never modified).
        run_dir: Where logs, the resolved config, checkpoints and exports go (default
            ``cfg.run.output_dir / cfg.run.name``).
    """

    def __init__(self, cfg, run_dir: Optional[Path] = None) -> None:
        from .config import derive, write_resolved

        self.cfg = cfg
        self.denv, self.device = init_distributed(cfg.run.device, cfg.distributed.backend, cfg.distributed.timeout_s)
        self.ctx = ParallelContext.from_group(None)
        self.rank, self.world = self.ctx.rank, self.ctx.world_size
        self.run_dir = Path(run_dir) if run_dir is not None else Path(cfg.run.output_dir) / cfg.run.name
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self._barrier()
        self.metrics = self._build_metrics()
        self.amp_dtype = _DTYPES[cfg.precision.dtype]
        torch.manual_seed(cfg.run.seed)  # identical backbone initialisation on every rank

        self.loader = self._build_loader()
        num_classes = self.loader.num_classes
        head_cfg = dataclasses.replace(cfg.head, num_classes=num_classes) if cfg.head.num_classes != num_classes else cfg.head
        self.derived = derive(cfg, world_size=self.world, num_samples=self.loader.num_samples)
        if self.rank == 0:
            write_resolved(cfg, self.run_dir)
            (self.run_dir / "derived.json").write_text(json.dumps(dataclasses.asdict(self.derived), indent=2))

        self.backbone = self._build_backbone()
        o = cfg.optimizer
        backbone_opt = build_optimizer(o.name, param_groups(self.backbone, o.weight_decay), o.lr, o.momentum, o.betas, o.eps)
        self.engine = build_engine(
            cfg.distributed.engine, self.backbone, backbone_opt, device=self.device, world_size=self.world,
            precision=cfg.precision.dtype, zero_stage=cfg.distributed.zero_stage, micro_batch=cfg.data.batch_size,
            grad_accumulation=o.grad_accumulation, grad_clip=o.grad_clip,
            find_unused_parameters=cfg.distributed.find_unused_parameters, bucket_cap_mb=cfg.distributed.bucket_cap_mb,
        )
        class_counts = getattr(self.loader, "class_counts", None)
        self.head = PartialFCHead(head_cfg, class_counts=class_counts, device=self.device)
        head_lr = o.head_lr if o.head_lr is not None else o.lr
        head_wd = o.head_weight_decay if o.head_weight_decay is not None else o.weight_decay
        head_groups = [{"params": [self.head.weight], "weight_decay": head_wd}]
        if self.head.log_tau is not None:
            head_groups.append({"params": [self.head.log_tau], "weight_decay": 0.0})
        self.head_opt = build_optimizer(o.name, head_groups, head_lr, o.momentum, o.betas, o.eps)
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=cfg.precision.dtype == "fp16" and cfg.distributed.engine == "ddp",
            init_scale=cfg.precision.initial_scale, growth_interval=cfg.precision.growth_interval,
        )
        self.state = TrainState()
        self.pair_sets = self._load_pair_sets()
        self.ckpt_root = self.run_dir / cfg.checkpoint.dir
        self._maybe_resume()

    # --------------------------------------------------------------------------------- building
    def _barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def _build_metrics(self):
        from .metrics import MetricsHub, setup_logging

        setup_logging(self.run_dir, self.rank)
        m = self.cfg.metrics
        return MetricsHub(
            rank=self.rank, local_rank=self.denv.local_rank, world_size=self.world, run_dir=self.run_dir,
            prometheus=m.prometheus, host=m.host, port=m.port, per_rank=m.per_rank,
            tensorboard=m.tensorboard, progress_bar=m.progress_bar,
        )

    def _build_loader(self):
        from dali_pipelines import build_train_loader

        d = self.cfg.data
        memory_format = torch.channels_last if self.cfg.backbone.channels_last else torch.contiguous_format
        kind = d.kind
        return build_train_loader(
            kind, d.train_rec or None, batch_size=d.batch_size, rank=self.rank, world_size=self.world,
            device=self.device, seed=self.cfg.run.seed, shuffle=d.shuffle, flip=d.flip,
            tail="drop" if d.drop_last else "pad", memory_format=memory_format,
            num_workers=d.dali_threads if kind == "dali" else d.num_workers, strict=d.strict_decode,
            num_classes=(self.cfg.head.num_classes or None) if kind == "synthetic" else None,
        )

    def _build_backbone(self) -> torch.nn.Module:
        from partial_fc.backbones import build_backbone

        b = self.cfg.backbone
        model = build_backbone(b.name, num_features=b.num_features, dropout=b.dropout).to(self.device)
        if b.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if b.compile:
            model = torch.compile(model)
        return model

    def _load_pair_sets(self) -> list:
        if self.rank != 0 or not self.cfg.evaluation.bin_files:
            return []
        from .evaluate.runner import load_pair_set

        return [load_pair_set(p) for p in self.cfg.evaluation.bin_files]

    # --------------------------------------------------------------------------------- checkpoints
    def _maybe_resume(self) -> None:
        from .checkpoint import find_latest, load_checkpoint

        resume = self.cfg.checkpoint.resume
        if resume == "none":
            return
        path = find_latest(self.ckpt_root) if resume == "auto" else Path(resume)
        if path is None:
            return
        extra = load_checkpoint(path, self.head, self.head_opt, backbone=self.engine.module,
                                backbone_optimizer=self.engine.optimizer)
        self.state = TrainState(**extra["train_state"])
        if extra.get("scaler"):
            self.scaler.load_state_dict(extra["scaler"])
        if self.rank == 0:
            log.info("resumed from %s at step %d (epoch %d, position %d)", path, self.state.step,
                     self.state.epoch, self.state.position)

    def save(self) -> Path:
        from .checkpoint import save_checkpoint

        extra = {"train_state": self.state.to_dict(), "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {}}
        return save_checkpoint(self.ckpt_root, self.state.step, self.head, self.head_opt,
                               backbone=self.engine.module, backbone_optimizer=self.engine.optimizer,
                               extra_state=extra, keep_last=self.cfg.checkpoint.keep_last)

    # --------------------------------------------------------------------------------- the loop
    def _set_lr(self) -> dict[str, float]:
        s, d = self.cfg.schedule, self.derived
        f = lr_factor(self.state.step, d.total_steps, d.warmup_steps, s.decay, s.power, s.min_lr_ratio)
        lrs = {}
        for name, opt in (("backbone", self.engine.optimizer), ("head", self.head_opt)):
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * f
            lrs[name] = opt.param_groups[0]["lr"]
        return lrs

    def _optimizer_step(self) -> tuple[bool, float]:
        """Unscale, global norm, clip, step both optimizers or skip both. Returns (stepped, norm)."""
        o = self.cfg.optimizer
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.engine.optimizer)
            self.scaler.unscale_(self.head_opt)
        head_params = [p for p in self.head.parameters() if p.grad is not None]
        if self.engine.replicated_grads:
            norm = global_grad_norm(self.engine.module.parameters(), [self.head.weight], self.ctx, self.device)
        else:  # ZeRO-partitioned gradients: DeepSpeed clips the backbone; the head by its own norm
            norm = global_grad_norm([], [self.head.weight], self.ctx, self.device)
        if self.head.log_tau is not None and self.head.log_tau.grad is not None:
            norm = torch.sqrt(norm**2 + self.head.log_tau.grad.float().pow(2).sum())
        finite = bool(torch.isfinite(norm))
        if finite and o.grad_clip > 0:
            params = head_params + ([] if self.engine.clips_own_grads else list(self.engine.module.parameters()))
            clip_grads_(params, norm, o.grad_clip)
        if finite:
            if self.scaler.is_enabled():
                self.scaler.step(self.engine.optimizer)
                self.scaler.step(self.head_opt)
            else:
                self.engine.step()
                self.head_opt.step()
        elif not self.scaler.is_enabled() and self.cfg.distributed.engine == "deepspeed":
            self.engine.step()  # DeepSpeed must see the boundary; its own overflow check skips it
        if self.scaler.is_enabled():
            self.scaler.update()
        self.engine.zero_grad()
        self.head_opt.zero_grad(set_to_none=True)
        return finite, float(norm)

    def _note_nonfinite(self, why: str) -> None:
        self.state.skipped_steps += 1
        self.state.consecutive_nonfinite += 1
        self.metrics.inc_skipped_steps()
        log.warning("step %d skipped: %s (%d in a row)", self.state.step, why, self.state.consecutive_nonfinite)
        limit = self.cfg.run.max_nonfinite_steps
        if self.state.consecutive_nonfinite >= limit:
            raise NonFiniteLossError(
                f"{self.state.consecutive_nonfinite} consecutive steps with non-finite values (limit "
                f"run.max_nonfinite_steps={limit}): lower optimizer.lr, enable optimizer.grad_clip, use bf16 "
                "instead of fp16, or check the data; the last good checkpoint is in "
                f"{self.ckpt_root}"
            )

    def _micro_step(self, images: torch.Tensor, labels: torch.Tensor, last: bool, timer: _Timer) -> Optional[dict]:
        accum = self.cfg.optimizer.grad_accumulation
        sync = contextlib.nullcontext() if last else self.engine.no_sync()
        with sync:
            with timer("forward"):
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype != torch.float32):
                    emb = self.engine(images)
                    try:
                        out = self.head(emb, labels)
                    except FloatingPointError as e:  # raised on every rank alike (gathered check)
                        self._note_nonfinite(str(e))
                        return None
                loss = out["loss"]
            if not bool(torch.isfinite(loss.detach())):  # the head's loss is identical on every rank
                self._note_nonfinite(f"loss is {float(loss.detach())}")
                return None
            with timer("backward"):
                if self.cfg.distributed.engine == "deepspeed":
                    self.engine.backward(loss)
                else:
                    self.scaler.scale(loss / accum).backward()
        return out

    def fit(self) -> dict[str, Any]:
        """Runs until ``derived.total_steps`` optimizer steps; returns a summary dict."""
        cfg, d = self.cfg, self.derived
        accum = cfg.optimizer.grad_accumulation
        timer = _Timer(self.device)
        self.engine.train(True)
        self.head.train(True)
        summary: dict[str, Any] = {"run_dir": str(self.run_dir)}
        if self.rank == 0:
            log.info("training %s: %d optimizer steps, %d per epoch, global batch %d, %d rank(s), %s",
                     cfg.run.name, d.total_steps, d.steps_per_epoch, d.global_batch, self.world, self.device)
        images_seen, t_window = 0, time.perf_counter()
        micro_in_step = 0
        last_out: Optional[dict] = None
        bad_in_step = False
        while self.state.step < d.total_steps:
            self.loader.set_epoch(self.state.epoch, self.state.position)
            it = iter(self.loader)
            epoch_done = False
            while self.state.step < d.total_steps:
                with timer("data"):
                    batch = next(it, None)
                if batch is None:
                    epoch_done = True
                    break
                images, labels = batch
                micro_in_step += 1
                last = micro_in_step == accum
                out = self._micro_step(images, labels, last, timer)
                self.state.micro_step += 1
                self.state.position += images.shape[0]
                images_seen += images.shape[0]
                if out is None:
                    bad_in_step = True
                else:
                    last_out = out
                if not last:
                    continue
                micro_in_step = 0
                lrs = self._set_lr()
                with timer("optimizer"):
                    if bad_in_step:  # a micro-step was skipped: drop the whole accumulated step
                        self.engine.zero_grad()
                        self.head_opt.zero_grad(set_to_none=True)
                        stepped, norm = False, float("nan")
                    else:
                        stepped, norm = self._optimizer_step()
                        if not stepped:
                            self._note_nonfinite(f"gradient norm is {norm}")
                bad_in_step = False
                if stepped:
                    self.state.consecutive_nonfinite = 0
                self.state.step += 1
                self._after_step(last_out, lrs, norm, timer, images_seen, t_window)
                if self.state.step % cfg.run.log_every == 0:
                    images_seen, t_window = 0, time.perf_counter()
                if cfg.checkpoint.every_steps and self.state.step % cfg.checkpoint.every_steps == 0:
                    self.save()
                if cfg.evaluation.every_steps and self.state.step % cfg.evaluation.every_steps == 0:
                    self.evaluate()
            if epoch_done:
                self.state.epoch += 1
                self.state.position = 0
        self.save()
        summary["eval"] = self.evaluate()
        summary["step"] = self.state.step
        summary["skipped_steps"] = self.state.skipped_steps
        if last_out is not None:
            summary["final_loss"] = {k: float(v.detach()) for k, v in last_out.items()}
        return summary

    def _after_step(self, out, lrs, norm, timer: _Timer, images_seen: int, t_window: float) -> None:
        if out is None or self.state.step % self.cfg.run.log_every:
            timer.pop()
            return
        elapsed = max(time.perf_counter() - t_window, 1e-9)
        ips = images_seen * self.world / elapsed
        losses = {k: float(v.detach()) for k, v in out.items()}
        timings = timer.pop()
        self.metrics.update(
            step=self.state.step, epoch=self.state.epoch, losses=losses, lr=lrs, timings=timings,
            images_per_s=ips, grad_norm=norm, loss_scale=self.scaler.get_scale() if self.scaler.is_enabled() else 1.0,
            head_stats=self.head.last_stats, skipped_records=getattr(self.loader, "skipped", 0),
        )
        if self.rank == 0:
            log.info("step %d/%d epoch %d loss %.4f (ce %.4f con %.4f ali %.4f) lr %.5f %.0f img/s grad-norm %.3f",
                     self.state.step, self.derived.total_steps, self.state.epoch, losses["loss"], losses["ce"],
                     losses["con"], losses["ali"], lrs["backbone"], ips, norm)

    # --------------------------------------------------------------------------------- evaluation
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
                    r = evaluate_pair_set(module, ps, self.device, e.batch_size, e.flip_test, e.far_targets)
                    log.info("eval step %d %s", self.state.step, r.summary())
                    results[r.name] = {"accuracy": r.accuracy, "accuracy_std": r.accuracy_std,
                                       "threshold": r.threshold, "tar": {str(k): v for k, v in r.tar.items()}}
                    self.metrics.record_eval(r.name, {"accuracy": r.accuracy, **{f"tar@{k:g}": v for k, v in r.tar.items()}})
            finally:
                module.train(was_training)
        self._barrier()
        return results

    def export(self) -> dict[str, Any]:
        """Rank 0 writes the backbone state dict and (optionally) ONNX, and checks ONNX parity."""
        out: dict[str, Any] = {}
        if self.rank == 0:
            from .export import check_onnx, export_onnx, export_state_dict

            x = self.cfg.export
            meta = {"backbone": self.cfg.backbone.name, "embedding_size": self.cfg.backbone.num_features,
                    "step": self.state.step}
            out["state_dict"] = str(export_state_dict(self.engine.module, self.run_dir / "export" / "backbone.pt", meta))
            if x.onnx:
                path = export_onnx(self.engine.module, self.run_dir / "export" / x.output_name,
                                   embedding_size=self.cfg.backbone.num_features, backbone_name=self.cfg.backbone.name,
                                   opset=x.opset)
                out["onnx"] = str(path)
                out["onnx_max_abs_diff"] = check_onnx(self.engine.module, path, batch=5)
        self._barrier()
        return out

    def close(self) -> None:
        self.metrics.close()
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()

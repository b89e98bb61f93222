"""Builders for the pieces of a run: seeds, loader, backbone, head optimizer, loss scaler, metrics,
evaluation pair sets. Each is a function of the config (and the rank/device it runs on)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from ..optimizer_setup import build_optimizer, param_groups

__all__ = ["build_model", "seed_everything", "build_loader", "build_backbone", "build_head_optimizer", "build_scaler",
           "build_metrics", "load_pair_sets"]


def seed_everything(seed: int) -> None:
    # The same seed on every rank: the backbone starts identical everywhere (DDP also broadcasts
    # it, DeepSpeed does not check); per-rank streams (head sampling, data order) derive their own
    # seeds from it explicitly.
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_loader(cfg, rank: int, world: int, device: torch.device):
    """The train loader of ``cfg.data`` (synthetic, DALI, or the torch fallback)."""
    from dali_pipelines import build_train_loader

    d = cfg.data
    memory_format = torch.channels_last if cfg.backbone.channels_last else torch.contiguous_format
    common = dict(batch_size=d.batch_size, rank=rank, world_size=world, seed=cfg.run.seed,
                  shuffle=d.shuffle, flip=d.flip, tail="drop" if d.drop_last else "pad",
                  memory_format=memory_format, strict=d.strict_decode, image_size=d.image_size)
    if d.kind == "synthetic":
        num_classes = cfg.head.num_classes or d.synth.identities
        return build_train_loader("synthetic", None, device=device, num_classes=num_classes,
                                  num_samples=d.synth.num_samples, num_workers=0, **common)
    rec = Path(d.train_rec)
    if not rec.is_file():
        raise FileNotFoundError(
            f"data.train_rec = {str(rec)!r} does not exist. For the generated demo data set run "
            f"`pfc synth --config <recipe>` first (it writes {d.synth.train_rec}), or point "
            "data.train_rec at your .rec (its .idx next to it)"
        )
    # DALI's CPU decode delivers CPU tensors; they are copied to the training device by the feed.
    if d.kind == "dali" and d.dali_decode == "cpu":
        device = torch.device("cpu")
    workers = d.dali_threads if d.kind == "dali" else d.num_workers
    return build_train_loader(d.kind, rec, device=device, num_workers=workers,
                              num_classes=cfg.head.num_classes, **common)


def build_backbone(cfg, device: torch.device) -> torch.nn.Module:
    from partial_fc.backbones import build_backbone as build

    b = cfg.backbone
    # input_size only when not the default 112, so backbones without the option still build.
    size = {"input_size": cfg.data.image_size} if cfg.data.image_size != 112 else {}
    model = build(b.name, num_features=b.num_features, dropout=b.dropout, **size).to(device)
    if b.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if b.compile:
        model = torch.compile(model)
    return model


def build_head_optimizer(cfg, derived, head) -> torch.optim.Optimizer:
    o, d = cfg.optimizer, derived
    groups = [{"params": [head.weight], "weight_decay": d.head_weight_decay}]
    if head.log_tau is not None:
        groups.append({"params": [head.log_tau], "weight_decay": 0.0})
    # head.row_update="lazy": row optimizers that touch only the sampled rows (partial_fc.optim).
    return build_optimizer(o.name, groups, d.head_lr, o.momentum, o.betas, o.eps, rows=cfg.head.row_update)


def build_scaler(cfg, device: torch.device) -> torch.amp.GradScaler:
    """The fp16 loss scaler (disabled for fp32/bf16); one scale covers backbone and head."""
    p = cfg.precision
    static = not isinstance(p.loss_scale, str)
    return torch.amp.GradScaler(
        device.type, enabled=p.dtype == "fp16",
        init_scale=float(p.loss_scale) if static else p.initial_scale,
        # A static scale never grows (and never backs off below the given value in practice:
        # an overflow still skips the step, as it must).
        growth_interval=10**9 if static else p.growth_interval,
        growth_factor=1.0 if static else 2.0, backoff_factor=1.0 if static else 0.5,
    )


def build_metrics(cfg, derived, denv, rank: int, world: int, device: torch.device, initial_step: int):
    from ..metrics import MetricsHub

    m = cfg.metrics
    return MetricsHub(
        rank=rank, local_rank=denv.local_rank, world_size=world, run_dir=cfg.run_dir,
        prometheus=m.prometheus, host=m.host, port=m.port, per_rank=m.per_rank,
        tensorboard=m.tensorboard, progress=m.progress_bar, total_steps=derived.total_steps,
        device=device, initial_step=initial_step,
    )


def load_pair_sets(cfg, rank: int) -> list:
    if rank != 0 or not cfg.evaluation.bin_files:
        return []
    from ..evaluate.runner import load_pair_set

    return [load_pair_set(p, image_size=cfg.data.image_size) for p in cfg.evaluation.bin_files]


def build_model(cfg, derived, loader, device: torch.device, world: int):
    """``(engine, head, head_opt, scaler)``: the backbone in its data-parallel engine with its
    optimizer, the Partial FC head with its optimizer, and the fp16 loss scaler."""
    from partial_fc import PartialFCHead

    from ..engines import build_engine

    o = cfg.optimizer
    backbone = build_backbone(cfg, device)
    backbone_opt = build_optimizer(o.name, param_groups(backbone, o.weight_decay), o.lr, o.momentum, o.betas, o.eps)
    engine = build_engine(
        cfg.distributed.engine, backbone, backbone_opt, device=device, world_size=world,
        precision=cfg.precision.dtype, zero_stage=cfg.distributed.zero_stage,
        micro_batch=cfg.data.batch_size, grad_accumulation=o.grad_accumulation, grad_clip=o.grad_clip,
        find_unused_parameters=cfg.distributed.find_unused_parameters,
        bucket_cap_mb=cfg.distributed.bucket_cap_mb,
    )
    head = PartialFCHead(cfg.head, class_counts=getattr(loader, "class_counts", None), device=device)
    # The head's per-step input checks report through device flags that the optimizer step reads
    # with the gradient norm (one host read per step; docs/training.md, "Host syncs").
    head.defer_input_checks = True
    return engine, head, build_head_optimizer(cfg, derived, head), build_scaler(cfg, device)

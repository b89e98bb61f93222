"""Data-parallel engines for the backbone: DDP (default) or DeepSpeed ZeRO, behind one interface.

The Partial FC head is never handed to an engine: its class shards and their optimizer state stay
local to their rank (see docs/distributed.md). An engine owns the backbone, its optimizer, and
the backward pass; the trainer owns the head's optimizer and the loss scaler.

Precision:
* DDP: fp32, bf16 autocast, or fp16 autocast with a ``torch.amp.GradScaler`` whose scale covers the
  backbone and the head together (both optimizers are unscaled and skipped together).
* DeepSpeed: the engine runs in fp32 and bf16 comes from autocast, because DeepSpeed's own bf16/fp16
  modes cast BatchNorm buffers and then fail on them. fp16 with DeepSpeed is refused with a clear
  message: its loss scaler cannot cover the head's separate optimizer.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import torch
from torch import nn

__all__ = ["Engine", "DDPEngine", "DeepSpeedEngine", "build_engine", "BY_NAME", "TorchOptimizerCheckpoint",
           "ZeroOptimizerCheckpoint"]

#: ``layout`` of a backbone optimizer state saved by parameter name (the ZeRO-1/2 checkpoint form):
#: ``{"layout": BY_NAME, "optimizer": class name, "param_groups": [{hyperparameters, "params": [names]}],
#: "state": {name: {key: full tensor shaped like the parameter, or a scalar}}}``. It holds the whole
#: (unpartitioned) state, so it loads on any world size, into ZeRO-1/2 or into DDP.
BY_NAME = "by_parameter_name"


def _names_by_id(module: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in module.named_parameters()}


def _torch_to_by_name(sd: dict, names_in_order: list[str], cls: str) -> dict:
    """A torch ``optimizer.state_dict()`` (params as positions) -> the by-name layout."""
    flat = [i for g in sd["param_groups"] for i in g["params"]]
    if len(flat) != len(names_in_order):
        raise ValueError(f"the checkpoint's backbone optimizer has {len(flat)} parameters, this backbone's optimizer "
                         f"{len(names_in_order)}: a different backbone or parameter grouping")
    pos = dict(zip(flat, names_in_order))
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [pos[i] for i in g["params"]]}
              for g in sd["param_groups"]]
    return {"layout": BY_NAME, "optimizer": cls, "param_groups": groups,
            "state": {pos[i]: dict(st) for i, st in sd["state"].items()}}


def _check_names(saved: dict, current: list[list[str]]) -> None:
    have = {n for g in saved["param_groups"] for n in g["params"]}
    want = {n for g in current for n in g}
    if have != want:
        missing, extra = sorted(want - have)[:5], sorted(have - want)[:5]
        raise ValueError(f"the checkpoint's backbone optimizer covers other parameters than this backbone's: "
                         f"missing {missing}, unexpected {extra} (a different backbone?)")


class TorchOptimizerCheckpoint:
    """The checkpoint view of a plain (replicated) torch optimizer: saves torch's own format, loads
    that or the by-name layout (a ZeRO run continued under DDP)."""

    collective = False

    def __init__(self, optimizer: torch.optim.Optimizer, module: nn.Module) -> None:
        self.optimizer, self.module = optimizer, module

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("layout") == BY_NAME:
            by_id = _names_by_id(self.module)
            current = [[by_id[id(p)] for p in g["params"]] for g in self.optimizer.param_groups]
            _check_names(sd, current)
            index = {n: i for i, n in enumerate(n for g in current for n in g)}
            groups = []
            for g, names in zip(self.optimizer.param_groups, current):
                saved = next(sg for sg in sd["param_groups"] if set(sg["params"]) == set(names))
                groups.append({**{k: v for k, v in saved.items() if k != "params"}, "params": [index[n] for n in names]})
            sd = {"state": {index[n]: st for n, st in sd["state"].items()}, "param_groups": groups}
        self.optimizer.load_state_dict(sd)


class Engine:
    """Common interface: ``engine(images) -> embeddings``, ``backward``, ``step``, ``no_sync``."""

    module: nn.Module  # the unwrapped backbone
    optimizer: torch.optim.Optimizer
    clips_own_grads = False  # True when the engine clips the backbone itself (DeepSpeed)
    replicated_grads = True  # backbone gradients identical on all ranks after backward

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self) -> None:
        raise NotImplementedError

    def zero_grad(self) -> None:
        raise NotImplementedError

    def no_sync(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])

    @property
    def checkpoint_optimizer(self):
        """What the checkpoint saves and loads the backbone optimizer through: an object with
        ``state_dict()`` (collective when its ``collective`` is True: every rank calls it, rank 0's
        result is saved) and ``load_state_dict(state)`` (every rank)."""
        return TorchOptimizerCheckpoint(self.optimizer, self.module)

    def weights_loaded(self) -> None:
        """Called after the backbone's weights were replaced (resume, ``model.init_from``)."""


class DDPEngine(Engine):
    """DistributedDataParallel over the default group (or plain module on one process).

    Args:
        module: The backbone, already on its device.
        optimizer: Its optimizer.
        device: The device (``device_ids`` for CUDA).
        world_size: Number of ranks; DDP is skipped at 1.
        find_unused_parameters: DDP option.
        bucket_cap_mb: DDP gradient bucket size.
    """

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                 world_size: int, find_unused_parameters: bool = False, bucket_cap_mb: float = 25.0) -> None:
        self.module = module
        self.optimizer = optimizer
        self.wrapped: nn.Module = module
        if world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.wrapped = DDP(
                module, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=find_unused_parameters, bucket_cap_mb=bucket_cap_mb,
                # Rank 0's BatchNorm statistics are broadcast at init and each forward, so every
                # rank holds the same buffers and a checkpoint (written from rank 0) resumes
                # exactly on any rank. (torch 2.13's name for the deprecated broadcast_buffers=True.)
                forward_sync_buffers=True,
            )

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.wrapped(images)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def no_sync(self) -> contextlib.AbstractContextManager:
        return self.wrapped.no_sync() if hasattr(self.wrapped, "no_sync") else contextlib.nullcontext()


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO stage 0/1/2 around the backbone (fp32 engine; bf16 via autocast).

    Args:
        module: The backbone.
        optimizer: A torch optimizer over the backbone (DeepSpeed wraps it).
        zero_stage: 0, 1 or 2.
        micro_batch: Per-rank batch size.
        grad_accumulation: Micro-steps per optimizer step.
        grad_clip: Max norm of the backbone's gradients (0 = off); DeepSpeed clips them itself.
    """

    clips_own_grads = True

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, zero_stage: int, micro_batch: int,
                 grad_accumulation: int, world_size: int, grad_clip: float = 0.0) -> None:
        try:
            import deepspeed
        except ImportError as e:  # pragma: no cover - depends on the extra
            raise ImportError(
                "distributed.engine='deepspeed' needs DeepSpeed: pip install --no-build-isolation "
                "'partial-fc[deepspeed]' (after torch)"
            ) from e
        config = {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": grad_accumulation,
            "train_batch_size": micro_batch * grad_accumulation * world_size,
            "zero_optimization": {"stage": zero_stage},
            # ZeRO wraps our torch.optim SGD/AdamW; DeepSpeed only pre-approves its own optimizers.
            # Parity with DDP is checked in tests/integration/test_train.py.
            "zero_allow_untested_optimizer": True,
            "gradient_clipping": grad_clip,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        self.ds, self.optimizer, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=config)
        self.module = self.ds.module
        self.zero_stage = zero_stage
        self.replicated_grads = zero_stage == 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.ds(images)

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed divides by its gradient_accumulation_steps itself; the trainer passes the
        # undivided micro-step loss to it (see Trainer._micro_step).
        self.ds.backward(loss)

    def step(self) -> None:
        self.ds.step()

    def zero_grad(self) -> None:
        pass  # DeepSpeed zeroes after its own step

    def train(self, mode: bool = True) -> None:
        self.ds.train(mode)

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])

    @property
    def checkpoint_optimizer(self):
        if self.zero_stage > 0:
            return ZeroOptimizerCheckpoint(self.optimizer, self.module)
        return TorchOptimizerCheckpoint(self.optimizer, self.module)

    def weights_loaded(self) -> None:
        # ZeRO-1/2 keeps an fp32 master copy of this rank's partition, separate from the module's
        # parameters; without this the next step would start from the old weights again.
        if self.zero_stage > 0:
            self.optimizer.refresh_fp32_params()


class ZeroOptimizerCheckpoint:
    """The checkpoint view of DeepSpeed's ZeRO-1/2 optimizer: the by-name layout (:data:`BY_NAME`).

    Save gathers the whole state: each rank holds, for each parameter group, one flat fp32
    partition and the wrapped torch optimizer's state for it (tensors shaped like the partition,
    plus scalars such as AdamW's ``step``); every parameter knows which slice of the partition holds
    which slice of itself (DeepSpeed's ``_hp_mapping``). Each rank writes its slices into a zeroed
    buffer of the group's full size, and one all-reduce (sum) per group and state key assembles the
    whole state, which is then cut into per-parameter tensors. Load is the reverse and needs no
    collective: each rank copies its slices out of the full tensors. Nothing depends on the world
    size, so a checkpoint of N ranks loads on M ranks, under ZeRO or DDP.

    Limits: ZeRO stages 1 and 2 (stage 3 is refused by :func:`build_engine`); a 0-d parameter's
    optimizer state would be taken for a scalar (backbones have none).
    """

    collective = True
    #: Checkpoints of ZeRO runs written before this state was kept have none: warn, start fresh.
    missing_ok = True

    def __init__(self, zero_optimizer, module: nn.Module) -> None:
        self.zero, self.module = zero_optimizer, module

    def _groups(self) -> list[tuple[list, list[str], torch.Tensor]]:
        by_id = _names_by_id(self.module)
        return [(list(lps), [by_id[id(p)] for p in lps], flat)
                for lps, flat in zip(self.zero.bit16_groups, self.zero.single_partition_of_fp32_groups)]

    def state_dict(self) -> dict:
        import torch.distributed as dist

        base = self.zero.optimizer
        groups, state = [], {}
        for gi, (lps, names, flat) in enumerate(self._groups()):
            st = base.state.get(flat, {})
            part_keys = sorted(k for k, v in st.items() if torch.is_tensor(v) and v.shape == flat.shape)
            total = sum(p.numel() for p in lps)
            offsets = [0]
            for p in lps:
                offsets.append(offsets[-1] + p.numel())
            full = {}
            for key in part_keys:
                buf = torch.zeros(total, dtype=st[key].dtype, device=flat.device)
                for p, off in zip(lps, offsets):
                    m = p._hp_mapping
                    if m is not None:
                        lp, hp = m.lp_fragment_address, m.hp_fragment_address
                        buf[off + lp.start: off + lp.start + lp.numel].copy_(st[key][hp.start: hp.start + hp.numel])
                dist.all_reduce(buf, group=self.zero.real_dp_process_group[gi])
                full[key] = buf
            for p, name, off in zip(lps, names, offsets):
                ps = {key: full[key][off: off + p.numel()].view(p.shape) for key in part_keys}
                ps.update({k: v for k, v in st.items() if k not in part_keys})
                if ps:
                    state[name] = ps
            groups.append({**{k: v for k, v in base.param_groups[gi].items() if k != "params"}, "params": names})
        return {"layout": BY_NAME, "optimizer": type(base).__name__, "param_groups": groups, "state": state}

    def load_state_dict(self, sd: dict) -> None:
        base = self.zero.optimizer
        groups = self._groups()
        if sd.get("layout") != BY_NAME:  # torch's format, from a DDP (or ZeRO stage 0) run
            sd = _torch_to_by_name(sd, [n for _, names, _ in groups for n in names], type(base).__name__)
        if sd["optimizer"] != type(base).__name__:
            raise ValueError(f"the checkpoint holds {sd['optimizer']} state for the backbone, its optimizer is "
                             f"{type(base).__name__} (optimizer.name changed?)")
        _check_names(sd, [names for _, names, _ in groups])
        for gi, (lps, names, flat) in enumerate(groups):
            saved = next(g for g in sd["param_groups"] if set(g["params"]) == set(names))
            base.param_groups[gi].update({k: v for k, v in saved.items() if k != "params"})
            new: dict[str, Any] = {}
            for p, name in zip(lps, names):
                for key, value in sd["state"].get(name, {}).items():
                    if torch.is_tensor(value) and value.shape == p.shape and p.dim() > 0:
                        buf = new.setdefault(key, torch.zeros_like(flat))
                        m = p._hp_mapping
                        if m is not None:
                            lp, hp = m.lp_fragment_address, m.hp_fragment_address
                            buf[hp.start: hp.start + hp.numel].copy_(
                                value.reshape(-1)[lp.start: lp.start + lp.numel].to(flat.device, flat.dtype))
                    elif key not in new:
                        new[key] = value.clone().to(flat.device) if torch.is_tensor(value) else value
            base.state.pop(flat, None)
            if new:
                base.state[flat] = new


def build_engine(
    kind: str, module: nn.Module, optimizer: torch.optim.Optimizer, *, device: torch.device, world_size: int,
    precision: str = "fp32", zero_stage: int = 0, micro_batch: int = 1, grad_accumulation: int = 1,
    grad_clip: float = 0.0, find_unused_parameters: bool = False, bucket_cap_mb: float = 25.0,
) -> Engine:
    """Wraps the backbone in the configured data-parallel engine.

    Args:
        kind: ``"ddp"`` or ``"deepspeed"``.
        module: The backbone on ``device``.
        optimizer: The backbone's optimizer.
        device: Its device.
        world_size: Number of ranks.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        zero_stage: DeepSpeed ZeRO stage (0, 1 or 2).
        micro_batch: Per-rank batch (DeepSpeed's config needs it).
        grad_accumulation: Micro-steps per optimizer step.
        grad_clip: Backbone clipping for DeepSpeed (DDP clipping is global, done by the trainer).
        find_unused_parameters: DDP option.
        bucket_cap_mb: DDP option.
    """
    if kind == "ddp":
        return DDPEngine(module, optimizer, device, world_size, find_unused_parameters, bucket_cap_mb)
    if kind == "deepspeed":
        if precision == "fp16":
            raise ValueError(
                "precision.dtype='fp16' is not supported with DeepSpeed here: its loss scaler cannot cover the "
                "head's separate optimizer. Use precision.dtype='bf16', or distributed.engine='ddp' for fp16"
            )
        if zero_stage not in (0, 1, 2):
            raise ValueError(f"distributed.zero_stage must be 0, 1 or 2, got {zero_stage}")
        return DeepSpeedEngine(module, optimizer, zero_stage, micro_batch, grad_accumulation, world_size, grad_clip)
    raise ValueError(f"unknown engine {kind!r}; use 'ddp' or 'deepspeed'")

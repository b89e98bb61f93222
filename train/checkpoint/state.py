"""What goes into each file of a checkpoint: the head split into class-sharded and replicated state.

* Class-sharded (cut along dim 0 by class id, one file per rank named by its class range):
  ``weight``, every ``bank.*`` buffer, and the optimizer state of ``weight`` row for row
  (:func:`_shard_payload`).
* Replicated (rank 0 writes ``head_replicated.pt``): the scalar head state (``step``,
  ``log_tau``), the optimizer state of the other parameters and the param groups, keyed by
  parameter NAME so they load into a job whose optimizer was built anew (:func:`_replicated_payload`).
* The backbone (rank 0 writes ``backbone.pt``): its unwrapped ``state_dict``, optimizer, scheduler,
  scaler and the trainer's ``extra_state`` (:func:`_backbone_payload`).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Optional

import torch
from torch import nn

from .format import CheckpointError, _to_cpu

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
                "train/checkpoint/state.py how to shard it"
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


def _split_rows(name: str, state: dict, n_local: int) -> dict:
    """One parameter's optimizer state as ``{"rows": [C_local, ...] tensors, "scalars": the rest}``."""
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
    return {"rows": rows, "scalars": scalars}


def _shard_payload(head: nn.Module, head_optimizer: Optional[torch.optim.Optimizer], sharded: dict) -> dict:
    """The content of this rank's ``head_classes_*.pt``: its class range, rows and optimizer rows."""
    n_local = head.num_local_classes
    sharded_params = {n for n, _ in head.named_parameters() if n in sharded}
    optim = {name: _split_rows(name, state, n_local)
             for name, state in _optimizer_state_by_name(head, head_optimizer).items() if name in sharded_params}
    start = head.class_start
    return {
        "start": start,
        "end": start + n_local,
        "state": {k: v.cpu() for k, v in sharded.items()},
        "optim": optim,
    }


def _replicated_payload(head, head_optimizer, replicated: dict, sharded: dict) -> dict:
    """The content of ``head_replicated.pt``: scalar head state, other optimizer state, param groups."""
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


def _backbone_payload(backbone: Optional[nn.Module], backbone_optimizer: Any, lr_scheduler: Any, scaler: Any,
                      extra_state: dict, copy: Callable[[Any], Any] = _to_cpu) -> dict:
    """The content of ``backbone.pt``; ``copy`` moves each state to the host (``_to_cpu`` or a snapshot).

    ``backbone_optimizer`` is a torch optimizer or its state dict already gathered (ZeRO).
    """
    bopt = backbone_optimizer
    return {
        "model": None if backbone is None else copy(_unwrap(backbone).state_dict()),
        "optimizer": None if bopt is None else copy(bopt if isinstance(bopt, dict) else bopt.state_dict()),
        "lr_scheduler": None if lr_scheduler is None else copy(lr_scheduler.state_dict()),
        "scaler": None if scaler is None else copy(scaler.state_dict()),
        "extra": _to_cpu(extra_state),
    }


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

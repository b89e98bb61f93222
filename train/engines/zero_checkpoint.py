"""How the backbone optimizer's state is saved and loaded: torch's format, or by parameter name
(the ZeRO-1/2 checkpoint form, which loads on any world size, into ZeRO-1/2 or into DDP)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["BY_NAME", "TorchOptimizerCheckpoint", "ZeroOptimizerCheckpoint"]

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

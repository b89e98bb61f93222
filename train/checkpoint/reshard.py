"""Loading the head on any world size: class-range shards and optimizer state by parameter name.

A job on ``M`` ranks owns ``ClassPartition(num_classes, M).range(rank)``; it reads the rows of
every shard file (saved on ``N`` ranks, named by class range) that overlap its range, memory-mapped,
so it never materialises rows it does not own. Rows of W, of the bank buffers and of W's
optimizer state move between ranks but are never mixed, averaged or reset. The head optimizer's
state and param groups are matched by parameter NAME, not by position.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from .format import CheckpointError, _load
from .state import _param_names, _split_head_state


def _read_shard(path: Path, manifest: dict, shard: dict, sharded: dict, verify: bool) -> dict:
    """Loads one shard file and checks that it is the range the manifest says, with the head's keys."""
    s, e = shard["start"], shard["end"]
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
    return payload


class _OptimRows:
    """Collects the optimizer state of sharded parameters for the rows ``[lo, hi)`` of this rank."""

    def __init__(self, lo: int, hi: int) -> None:
        self.lo, self.hi = lo, hi
        self.rows: dict[str, dict[str, torch.Tensor]] = {}
        self.scalars: dict[str, dict] = {}
        self.seen: dict[str, int] = {}

    def add(self, optim: dict, s: int, a: int, b: int) -> None:
        """Takes rows ``[a, b)`` (global class ids) of a shard file starting at class ``s``."""
        lo = self.lo
        for pname, st in optim.items():
            self.seen[pname] = self.seen.get(pname, 0) + (b - a)
            rows = self.rows.setdefault(pname, {})
            for key, value in st["rows"].items():
                if key not in rows:
                    rows[key] = torch.empty((self.hi - lo, *value.shape[1:]), dtype=value.dtype)
                rows[key][a - lo : b - lo] = value[a - s : b - s]
            scal = self.scalars.setdefault(pname, {})
            for key, value in st["scalars"].items():
                if key in scal and isinstance(value, torch.Tensor) and not torch.equal(scal[key], value):
                    warnings.warn(f"optimizer scalar {pname}.{key} differs between shard files "
                                  f"({scal[key]} vs {value}); keeping the larger", stacklevel=5)
                    value = torch.maximum(scal[key], value)
                scal[key] = value.clone() if isinstance(value, torch.Tensor) else value

    def result(self, path: Path) -> dict[str, dict]:
        out = {}
        for pname, rows in self.rows.items():
            if self.seen[pname] != self.hi - self.lo:
                raise CheckpointError(
                    f"{path}: only some shard files hold optimizer state for {pname!r}; the checkpoint is inconsistent"
                )
            out[pname] = {**self.scalars.get(pname, {}), **rows}
        return out


def _load_head_shards(path: Path, manifest: dict, head: nn.Module, verify: bool) -> dict[str, dict]:
    """Fills the head's class-sharded state from the overlapping rows of every shard file.

    Returns:
        ``{param name: {state key: tensor or scalar}}``, the optimizer state of sharded parameters
        for this rank's rows.
    """
    sharded, _ = _split_head_state(head)
    lo, hi = head.class_start, head.class_start + head.num_local_classes
    filled = {k: 0 for k in sharded}
    optim = _OptimRows(lo, hi)
    for shard in manifest["shards"]:
        s, e = shard["start"], shard["end"]
        a, b = max(lo, s), min(hi, e)
        if a >= b:
            continue
        payload = _read_shard(path, manifest, shard, sharded, verify)
        with torch.no_grad():
            for key, target in sharded.items():
                target[a - lo : b - lo].copy_(payload["state"][key][a - s : b - s])
                filled[key] += b - a
        optim.add(payload["optim"], s, a, b)
    assert all(v == hi - lo for v in filled.values()), "shard ranges validated to tile the classes"
    return optim.result(path)


def _check_optimizer_fits(path: Path, head, head_optimizer, replicated: dict) -> list[list[str]]:
    """Same optimizer class and the same param groups (by name) as at save time; returns the names."""
    saved_cls = replicated["optimizer"]
    if saved_cls != type(head_optimizer).__name__:
        raise CheckpointError(f"{path} holds {saved_cls} state for the head, the head optimizer is "
                              f"{type(head_optimizer).__name__}")
    names = _param_names(head, head_optimizer)
    saved_groups = replicated["param_groups"]
    if [sorted(g["params"]) for g in saved_groups] != [sorted(n) for n in names]:
        raise CheckpointError(
            f"{path}: head optimizer param groups differ from the checkpoint's: saved "
            f"{[g['params'] for g in saved_groups]}, now {names}"
        )
    return names


def _load_optimizer(head, head_optimizer, replicated: dict, sharded_state: dict, path: Path) -> None:
    """Loads the head optimizer from the replicated state and this rank's rows, matched by name."""
    if replicated["optimizer"] is None:
        warnings.warn(f"{path} holds no head optimizer state; the head optimizer starts fresh", stacklevel=4)
        return
    names = _check_optimizer_fits(path, head, head_optimizer, replicated)
    index = {}
    current = head_optimizer.state_dict()["param_groups"]
    for group_names, group in zip(names, current):
        index.update(zip(group_names, group["params"]))
    state_by_name = {**replicated["optim_state"], **sharded_state}
    groups = []
    for saved, group in zip(replicated["param_groups"], current):
        g = {k: v for k, v in saved.items() if k != "params"}
        g["params"] = list(group["params"])
        groups.append(g)
    head_optimizer.load_state_dict(
        {"state": {index[n]: dict(s) for n, s in state_by_name.items() if n in index}, "param_groups": groups}
    )

"""Runs a function on N spawned gloo ranks with a file rendezvous and a hard timeout.

A hang (a rank stuck in a collective) becomes a test failure after ``timeout`` seconds instead of a
stalled CI job; an exception on any rank is re-raised in the test with that rank's traceback.
"""

from __future__ import annotations

import datetime
import os
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.multiprocessing as mp


def _worker(rank: int, world_size: int, fn: Callable, rdv: str, out_dir: str, kwargs: dict) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    result: Any
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{rdv}", rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=60),
        )
        try:
            result = ("ok", fn(rank, world_size, **kwargs))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - everything goes back to the parent test
        result = ("error", traceback.format_exc())
    with open(os.path.join(out_dir, f"rank{rank}.pt"), "wb") as f:
        torch.save(result, f)


def run_distributed(fn: Callable, world_size: int, tmp_path: Path, timeout: float = 120.0, **kwargs) -> list:
    """Runs ``fn(rank, world_size, **kwargs)`` on ``world_size`` gloo processes.

    Args:
        fn: A module-level function (picklable by reference) returning CPU tensors / plain data.
        world_size: Number of ranks.
        tmp_path: A fresh directory for the rendezvous file and results.
        timeout: Seconds before all ranks are killed and the test fails.

    Returns:
        The per-rank return values, in rank order.
    """
    out_dir = tmp_path / f"ranks{world_size}_{time.monotonic_ns()}"
    out_dir.mkdir()
    rdv = str(out_dir / "rendezvous")
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, fn, rdv, str(out_dir), kwargs), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    alive = [i for i, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
    if alive:
        raise TimeoutError(f"ranks {alive} still running after {timeout}s (a hang in a collective?)")
    results = []
    for r in range(world_size):
        path = out_dir / f"rank{r}.pt"
        if not path.exists():
            raise RuntimeError(f"rank {r} exited with code {procs[r].exitcode} without a result")
        status, value = torch.load(path, weights_only=False)  # our own files, written above
        if status == "error":
            raise AssertionError(f"rank {r} failed:\n{value}")
        results.append(value)
    return results


__all__ = ["run_distributed"]

"""Memory figures of the process and the CUDA device (for ``pfc_memory_bytes`` and the allocator series)."""

from __future__ import annotations

import os
import resource
import sys
from typing import Optional

import torch

__all__ = ["memory_stats", "cuda_allocator_stats"]


def _rss_bytes() -> Optional[float]:
    try:
        with open("/proc/self/statm") as f:
            return float(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, IndexError):
        return None


def _peak_rss_bytes() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def memory_stats(device: torch.device) -> dict[str, float]:
    """Device memory in bytes: allocated/reserved/peak on CUDA; rss/peak_rss of the process."""
    out: dict[str, float] = {}
    if device.type == "cuda" and torch.cuda.is_available():
        out["allocated"] = float(torch.cuda.memory_allocated(device))
        out["reserved"] = float(torch.cuda.memory_reserved(device))
        out["peak"] = float(torch.cuda.max_memory_allocated(device))
    rss = _rss_bytes()
    if rss is not None:
        out["rss"] = rss
    out["peak_rss"] = _peak_rss_bytes()
    return out


def cuda_allocator_stats(device: torch.device) -> dict[str, float]:
    """The caching allocator's cumulative retries and OOMs on a CUDA device; empty elsewhere.

    ``num_alloc_retries`` counts allocations that failed, freed the cache and succeeded on retry
    (each a full cudaFree/cudaMalloc cycle: a sign of fragmentation or a batch at the edge of memory);
    ``num_ooms`` counts out-of-memory errors raised to the caller.
    """
    if device.type != "cuda" or not torch.cuda.is_available():
        return {}
    s = torch.cuda.memory_stats(device)
    return {"cuda_alloc_retries": float(s.get("num_alloc_retries", 0)), "cuda_ooms": float(s.get("num_ooms", 0))}

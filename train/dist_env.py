"""Process-group set-up from the launcher's environment: torchrun, Slurm (srun without torchrun), or
a single process.

The trainer calls :func:`init_distributed` once, explicitly; nothing here runs at import.
"""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.distributed as dist

__all__ = ["DistEnv", "read_launch_env", "init_distributed", "first_slurm_host"]


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job.

    Attributes:
        rank: Global rank.
        local_rank: Rank on this node (selects the GPU).
        world_size: Number of processes in the job.
        master_addr: Rendezvous host (env:// init), or None when torchrun's store is used.
        master_port: Rendezvous port.
        source: ``"torchrun"``, ``"slurm"`` or ``"single"``.
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    master_addr: Optional[str] = None
    master_port: Optional[int] = None
    source: str = "single"


def first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list such as ``gpu[003-005,010],login1`` -> ``gpu003``.

    ``scontrol show hostnames`` does this on a cluster; this parser covers the compressed forms
    Slurm emits so the mapping also works where ``scontrol`` is not on the PATH.
    """
    nodelist = nodelist.strip()
    if not nodelist:
        raise ValueError("empty SLURM_JOB_NODELIST")
    m = re.match(r"^([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if not m:
        raise ValueError(f"cannot parse SLURM_JOB_NODELIST {nodelist!r}")
    prefix, ranges = m.group(1), m.group(3)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def read_launch_env(env: Optional[Mapping[str, str]] = None, default_port: int = 29500) -> DistEnv:
    """Maps the launcher's variables to rank, local rank and world size.

    torchrun sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` (and ``MASTER_ADDR``/``MASTER_PORT``);
    these win when present. Under ``srun`` without torchrun, ``SLURM_PROCID``, ``SLURM_LOCALID``
    and ``SLURM_NTASKS`` give the same facts; the rendezvous host is the first node of
    ``SLURM_JOB_NODELIST`` (or ``MASTER_ADDR`` if set) and the port ``MASTER_PORT`` or a value derived
    from the job id, so concurrent jobs on shared nodes do not collide.

    Args:
        env: The environment (``os.environ`` when ``None``).
        default_port: Port when neither ``MASTER_PORT`` nor a Slurm job id is available.

    Returns:
        The mapping.
    """
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=int(env["RANK"]), local_rank=int(env.get("LOCAL_RANK", 0)), world_size=int(env["WORLD_SIZE"]),
            master_addr=env.get("MASTER_ADDR"), master_port=int(env["MASTER_PORT"]) if "MASTER_PORT" in env else None,
            source="torchrun",
        )
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        job = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
        port = int(env["MASTER_PORT"]) if "MASTER_PORT" in env else (
            10000 + int(job) % 20000 if job and job.isdigit() else default_port
        )
        addr = env.get("MASTER_ADDR") or first_slurm_host(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "")))
        return DistEnv(
            rank=int(env["SLURM_PROCID"]), local_rank=int(env.get("SLURM_LOCALID", 0)),
            world_size=int(env["SLURM_NTASKS"]), master_addr=addr, master_port=port, source="slurm",
        )
    return DistEnv()


def init_distributed(
    device: str = "auto", backend: str = "auto", timeout_s: float = 1800.0, env: Optional[Mapping[str, str]] = None
) -> tuple[DistEnv, torch.device]:
    """Initialises the default process group (when the job has more than one process).

    Args:
        device: ``"auto"`` (CUDA if available), ``"cpu"`` or ``"cuda"``.
        backend: ``"auto"`` (NCCL on CUDA, gloo on CPU), ``"nccl"`` or ``"gloo"``.
        timeout_s: Collective timeout.
        env: Environment override (tests).

    Returns:
        ``(DistEnv, torch.device)``; the device is ``cuda:<local_rank>`` on GPU.
    """
    denv = read_launch_env(env)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("run.device='cuda' but no CUDA device is visible; use run.device='cpu'")
        torch.cuda.set_device(denv.local_rank)
        dev = torch.device("cuda", denv.local_rank)
    else:
        dev = torch.device("cpu")
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if denv.world_size > 1 and not dist.is_initialized():
        if denv.source == "slurm":
            os.environ.setdefault("MASTER_ADDR", denv.master_addr or "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(denv.master_port))
        kwargs = dict(backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
                      rank=denv.rank, world_size=denv.world_size)
        if dev.type == "cuda":
            kwargs["device_id"] = dev  # lets NCCL bind eagerly and avoids a guess in barrier()
        dist.init_process_group(**kwargs)
    return denv, dev

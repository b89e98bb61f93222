"""Process-group set-up from the launcher's environment: torchrun, Slurm (srun without torchrun), or
a single process.

The trainer calls :func:`init_distributed` once, explicitly; nothing here runs at import.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.distributed as dist

log = logging.getLogger("train.dist_env")

__all__ = ["DistEnv", "read_launch_env", "init_distributed", "first_slurm_host", "expand_slurm_nodelist"]


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


def _split_top_level(text: str) -> list[str]:
    """Splits on commas outside brackets: ``a[1,3],b`` -> ``["a[1,3]", "b"]``."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"nested brackets in Slurm node list {text!r}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in Slurm node list {text!r}")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise ValueError(f"unbalanced '[' in Slurm node list {text!r}")
    parts.append("".join(cur))
    return parts


def _expand_ranges(spec: str, nodelist: str) -> list[str]:
    """``"01-03,07"`` -> ``["01", "02", "03", "07"]`` (zero padding of the lower bound kept)."""
    out = []
    for item in spec.split(","):
        lo, sep, hi = item.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"bad range {item!r} in Slurm node list {nodelist!r}")
        if not sep:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise ValueError(f"descending range {item!r} in Slurm node list {nodelist!r}")
        out.extend(str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1))
    return out


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """Expands a compressed Slurm node list into host names, in Slurm's order.

    Handles several comma-separated items (``gpu[01-02,05],cpu7`` -> ``gpu01 gpu02 gpu05 cpu7``)
    and several bracket groups in one item, expanded as a product with the leftmost group
    varying slowest (``r[1-2]n[1-2]`` -> ``r1n1 r1n2 r2n1 r2n2``). ``scontrol show hostnames``
    does the same on a cluster; this covers the places where it is not on the PATH.

    Args:
        nodelist: ``SLURM_JOB_NODELIST`` or ``SLURM_STEP_NODELIST``.

    Returns:
        The host names.

    Raises:
        ValueError: If the list is empty or malformed (unbalanced or nested brackets, bad ranges).
    """
    nodelist = nodelist.strip()
    if not nodelist:
        raise ValueError("empty Slurm node list (SLURM_JOB_NODELIST is not set?)")
    hosts: list[str] = []
    for item in _split_top_level(nodelist):
        if not item:
            raise ValueError(f"empty item in Slurm node list {nodelist!r}")
        names = [""]
        for literal, bracket, ranges in re.findall(r"([^\[]*)(\[([^\]]*)\])?", item):
            if bracket and not ranges:
                raise ValueError(f"empty brackets in Slurm node list {nodelist!r}")
            suffixes = _expand_ranges(ranges, nodelist) if bracket else [""]
            names = [n + literal + s for n in names for s in suffixes]
        hosts.extend(names)
    return hosts


def first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list such as ``gpu[003-005,010],login1`` -> ``gpu003``.

    Raises:
        ValueError: If the list is empty or malformed.
    """
    return expand_slurm_nodelist(nodelist)[0]


def read_launch_env(env: Optional[Mapping[str, str]] = None, default_port: int = 29500) -> DistEnv:
    """Maps the launcher's variables to rank, local rank and world size.

    torchrun sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` (and ``MASTER_ADDR``/``MASTER_PORT``);
    these win when present (also under ``srun torchrun``). Under ``srun`` without torchrun,
    ``SLURM_PROCID``, ``SLURM_LOCALID`` and the step's task count (``SLURM_STEP_NUM_TASKS``, else
    ``SLURM_NTASKS``) give the same facts, but only inside a job step (``SLURM_STEP_ID`` set): an
    ``sbatch`` batch shell also has ``SLURM_PROCID=0`` and ``SLURM_NTASKS=N`` and must stay a
    single process, not wait forever as rank 0 of N. The rendezvous host is ``MASTER_ADDR`` if
    set, else the first node of the step's node list (where task 0 runs); the port is
    ``MASTER_PORT``, else one derived from the job id so that concurrent jobs sharing a node do
    not collide.

    Args:
        env: The environment (``os.environ`` when ``None``).
        default_port: Port when neither ``MASTER_PORT`` nor a Slurm job id is available.

    Returns:
        The mapping.

    Raises:
        ValueError: If a rank variable is not an integer or the rank is outside the world.
    """
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        denv = DistEnv(
            rank=_int(env, "RANK"), local_rank=_int(env, "LOCAL_RANK", 0), world_size=_int(env, "WORLD_SIZE"),
            master_addr=env.get("MASTER_ADDR"),
            master_port=_int(env, "MASTER_PORT") if "MASTER_PORT" in env else None, source="torchrun",
        )
    elif "SLURM_PROCID" in env and "SLURM_STEP_ID" in env and \
            _int(env, "SLURM_STEP_NUM_TASKS", _int(env, "SLURM_NTASKS", 1)) > 1:
        job = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
        port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else (
            10000 + int(job) % 20000 if job and job.isdigit() else default_port
        )
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "")
        addr = env.get("MASTER_ADDR") or first_slurm_host(nodes)
        denv = DistEnv(
            rank=_int(env, "SLURM_PROCID"), local_rank=_int(env, "SLURM_LOCALID", 0),
            world_size=_int(env, "SLURM_STEP_NUM_TASKS", _int(env, "SLURM_NTASKS", 1)),
            master_addr=addr, master_port=port, source="slurm",
        )
    else:
        return DistEnv()
    if not 0 <= denv.rank < denv.world_size:
        raise ValueError(f"{denv.source} environment gives rank {denv.rank} outside world size {denv.world_size}")
    return denv


def _int(env: Mapping[str, str], name: str, default: Optional[int] = None) -> int:
    if name not in env:
        if default is None:
            raise ValueError(f"{name} is not set")
        return default
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"{name}={env[name]!r} is not an integer") from None


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
    _warn_shared_store_restarts(os.environ if env is None else env)
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


def _warn_shared_store_restarts(env: Mapping[str, str]) -> None:
    """Warns when torchrun restarts workers on its shared rendezvous store.

    With ``TORCHELASTIC_USE_AGENT_STORE=True`` every restart round's workers use the agent's one
    store under the same keys, so a restarted group can read the previous round's addresses and
    fail to connect (pytorch/pytorch#135712); ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (set by
    launch/torchrun.sh) gives each round a fresh store.
    """
    if env.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and env.get("TORCHELASTIC_MAX_RESTARTS", "0") not in ("", "0"):
        log.warning("torchrun --max-restarts with its shared rendezvous store: a restarted group may fail to "
                    "connect; export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun (launch/torchrun.sh "
                    "does), see docs/launch.md")

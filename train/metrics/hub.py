"""One process's metrics hub: turns what the trainer reports into one flat dict per logged step and
hands it to the loggers (Prometheus, TensorBoard, console, ``metrics.jsonl``)."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch

from .console import Console
from .counters import RunCounters
from .jsonl import JsonlLogger
from .memory import cuda_allocator_stats, memory_stats
from .prometheus import PrometheusLogger
from .tensorboard import open_tensorboard
from .values import far_label, parse_tar_key, to_float

log = logging.getLogger("train.metrics")

__all__ = ["MetricsHub", "step_metrics"]


def step_metrics(*, step=None, epoch=None, losses=None, lr=None, timings=None, images_per_s=None,
                 grad_norm=None, loss_scale=None, head_stats=None) -> dict[str, float]:
    """The flat dict of one step from its parts. Keys are those of :data:`train.metrics.series.SERIES`;
    values that are not numbers are left out.

    Args:
        step, epoch: Counters.
        losses: ``{"loss"|"total": ..., "ce": ..., "con": ..., "ali": ...}`` (floats or one-element
            tensors; the head's output dict works as is). Pass floats to avoid a device synchronisation.
        lr: ``{"backbone": ..., "head": ...}``, or one float (group ``"all"``).
        timings: ``{phase: seconds}`` as from :meth:`StepTimer.collect`; ``"step"`` or ``"total"``
            gives the step time, otherwise the phases are summed.
        images_per_s: Throughput of this rank.
        grad_norm, loss_scale: Floats (non-finite values are exported as they are).
        head_stats: The head's ``last_stats``; phi_*/margin_* map to ``pfc_head_phi`` /
            ``pfc_head_margin{stat}``, ``num_sampled_local`` and ``tau`` to their gauges, any other
            numeric key to ``pfc_head_stat{stat=<key>}``; non-numbers are ignored.
    """
    flat: dict[str, float] = {}

    def put(key: str, v: Any) -> None:
        f = to_float(v) if v is not None else None
        if f is not None:
            flat[key] = f

    put("step", step)
    put("train/epoch", epoch)
    for k, v in (losses or {}).items():
        put(f"loss/{'total' if k in ('loss', 'total') else k}", v)
    for g, v in (lr if isinstance(lr, Mapping) else ({"all": lr} if lr is not None else {})).items():
        put(f"lr/{g}", v)
    if timings:
        phases = {ph: to_float(v) for ph, v in timings.items() if ph not in ("step", "total")}
        phases = {ph: f for ph, f in phases.items() if f is not None}
        for ph, f in phases.items():
            flat[f"time/{ph}_s"] = f
        given = [to_float(timings[k]) for k in ("step", "total") if k in timings]
        flat["time/step_s"] = given[-1] if given and given[-1] is not None else sum(phases.values())
    put("perf/images_per_s", images_per_s)
    put("train/grad_norm", grad_norm)
    put("train/loss_scale", loss_scale)
    for k, v in (head_stats or {}).items():
        put(f"head/{k}", v)
    return flat


class MetricsHub:
    """One process's metrics: Prometheus endpoint, TensorBoard (rank 0), progress bar (rank 0),
    ``metrics.jsonl`` (rank 0).

    Args:
        rank, world_size: Global rank (the ``rank`` label of every series), number of ranks.
        local_rank: Rank on this node; the endpoint listens on ``port + local_rank`` when ``per_rank``.
        run_dir: Run directory for the port file, ``tensorboard/`` and ``metrics.jsonl``; created if missing.
        prometheus: Serve the HTTP endpoint (when off, :meth:`exposition` still has the registry).
        host: Address to bind; ``"127.0.0.1"`` (default) this machine only, ``"0.0.0.0"`` the network.
        port: Base port; 0 picks a free ephemeral port per rank.
        per_rank: Every rank serves (default); otherwise only rank 0 does, on ``port``.
        tensorboard: TensorBoard scalars on rank 0 (a warning and no-op without ``tensorboard``).
        progress: A tqdm bar on rank 0 (never when stdout is not a TTY).
        total_steps, initial_step: For the bar's rate and ETA (a resumed run starts at initial_step).
        device: Device whose memory is reported (default ``cuda:local_rank`` with CUDA, else CPU).
        tensorboard_every: Write TensorBoard scalars every this many ``update`` calls.
        port_fallback: Bind an ephemeral port (warning) when ``port`` is taken, instead of raising.
        jsonl: Append each update to ``run_dir/metrics.jsonl`` on rank 0.
    """

    def __init__(self, rank: int = 0, local_rank: int = 0, world_size: int = 1,
                 run_dir: Union[str, Path] = "runs/default", *, prometheus: bool = True, host: str = "127.0.0.1",
                 port: int = 9400, per_rank: bool = True, tensorboard: bool = True, progress: bool = True,
                 total_steps: Optional[int] = None, device: Union[torch.device, str, None] = None,
                 tensorboard_every: int = 1, port_fallback: bool = True, initial_step: int = 0,
                 jsonl: bool = True):
        self.rank, self.local_rank, self.world_size = int(rank), int(local_rank), int(world_size)
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if device is None:
            device = f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.total_steps = total_steps
        self.tensorboard_every = max(1, int(tensorboard_every))
        self._lock = threading.Lock()
        self._closed = False
        self._updates = 0
        self.counters = RunCounters()
        self._last_step: Optional[int] = None
        self.prom = PrometheusLogger(self.rank)
        self.registry = self.prom.registry
        self.prom.write({"world_size": self.world_size})
        self.host = host
        if prometheus and (per_rank or self.rank == 0):
            self.prom.serve(host, port + self.local_rank if (per_rank and port) else port, port_fallback, self.run_dir)
        lead = self.rank == 0
        self._tb = open_tensorboard(self.run_dir) if tensorboard and lead else None
        self._jsonl = JsonlLogger(self.run_dir) if jsonl and lead else None
        self.console = Console(progress and lead, total_steps, initial_step)

    from_config = classmethod(lambda cls, *a, **kw: hub_from_config(cls, *a, **kw))

    @property
    def port(self) -> Optional[int]:
        return self.prom.port

    @property
    def port_path(self) -> Optional[Path]:
        return self.prom.port_path

    @property
    def url(self) -> Optional[str]:
        """The metrics URL of this rank's endpoint, or ``None`` when it serves none."""
        return None if self.port is None else f"http://{self.host}:{self.port}/metrics"

    @property
    def tensorboard_enabled(self) -> bool:
        return self._tb is not None

    @property
    def progress_enabled(self) -> bool:
        return self.console.bar is not None

    @property
    def jsonl_path(self) -> Optional[Path]:
        return self._jsonl.path if self._jsonl is not None else None

    # -- updates -------------------------------------------------------------------------------
    def update(self, *, skipped_records: Optional[int] = None, consecutive_nonfinite: Optional[int] = None,
               memory: bool = True, **parts: Any) -> None:
        """Sets the latest values; every argument is optional. ``parts`` are the keyword arguments of
        :func:`step_metrics` (step, epoch, losses, lr, timings, images_per_s, grad_norm, loss_scale,
        head_stats), and:

        Args:
            skipped_records: The data layer's cumulative skipped-record count; the counter grows
                by the difference (a smaller value means the data layer restarted counting).
            consecutive_nonfinite: Set the non-finite streak explicitly. Otherwise it is reset to
                0 by an update whose total loss is finite and that follows no
                :meth:`inc_skipped_steps` call.
            memory: Refresh ``pfc_memory_bytes`` (and, on CUDA, the allocator's retries and OOMs).
        """
        flat = step_metrics(**parts)
        self.log(flat, skipped_records=skipped_records, consecutive_nonfinite=consecutive_nonfinite, memory=memory)

    def log(self, flat: dict[str, float], *, skipped_records: Optional[int] = None,
            consecutive_nonfinite: Optional[int] = None, memory: bool = True) -> None:
        """Hands one step's flat dict (plus the hub's counters, memory and time) to every logger."""
        if self._closed:
            return
        with self._lock:
            total = flat.get("loss/total")
            flat.update(self.counters.on_update(skipped_records, consecutive_nonfinite, total))
            if memory:
                flat.update({f"memory/{k}_bytes": b for k, b in memory_stats(self.device).items()})
                flat.update({f"memory/{k}": n for k, n in cuda_allocator_stats(self.device).items()})
            flat["last_update"] = time.time()
            self.prom.write(flat)
            self._updates += 1
            if "step" in flat:
                self._last_step = int(flat["step"])
        if self._tb is not None and (self._updates - 1) % self.tensorboard_every == 0:
            self._tb.write(flat, self._last_step if self._last_step is not None else self._updates)
        if self._jsonl is not None:
            self._jsonl.write(flat)
        lr = next((v for k, v in flat.items() if k.startswith("lr/")), None)
        self.console.write(self._last_step if "step" in flat else None, total, lr, flat.get("perf/images_per_s"))

    def inc_skipped_steps(self, n: int = 1) -> None:
        """Counts ``n`` skipped (non-finite) optimizer steps and extends the non-finite streak."""
        if not self._closed:
            with self._lock:
                self.prom.write(self.counters.skipped_steps(n))

    def inc_skipped_records(self, n: int = 1) -> None:
        """Counts ``n`` records skipped by the data layer (alternative to ``skipped_records=``)."""
        if not self._closed and n > 0:
            with self._lock:
                self.prom.write(self.counters.skipped_records(n))

    @property
    def consecutive_nonfinite(self) -> int:
        """The current non-finite streak (what ``pfc_nonfinite_consecutive_steps`` shows)."""
        return self.counters.streak

    def record_eval(self, set_name: str, results: Mapping[str, Any], step: Optional[int] = None) -> None:
        """Exports one evaluation set's results.

        ``results`` keys: ``accuracy``/``acc`` → ``pfc_eval_accuracy{set}``; ``tar@far=1e-4``
        (also ``tar@far1e-4``, ``tar@1e-4``, ``tar_at_far_1e-4``) or a nested ``{"tar": {far: v}}``
        → ``pfc_eval_tar{set,far}``; any other number → ``pfc_eval_metric{set,metric}``.
        """
        if self._closed:
            return
        s = str(set_name)
        step = self._last_step if step is None else int(step)
        flat, shown = _eval_flat(s, results)
        if step is not None:
            flat[f"eval/{s}/step"] = float(step)
        with self._lock:
            self.prom.write(flat)
        if self._tb is not None:
            self._tb.write(flat, step or 0, flush=True)
        if self._jsonl is not None:
            self._jsonl.write({"step": step, **flat})
        log.info("eval %s at step %s: %s", s, step, ", ".join(shown))

    # -- output --------------------------------------------------------------------------------
    def eta_seconds(self) -> Optional[float]:
        """Seconds left to ``total_steps`` at the average rate since the first update, or None."""
        return self.console.eta_seconds()

    def headline(self) -> str:
        """One log line with the headline figures (for logs when the bar is off, e.g. Slurm):
        ``step 120/1000 loss 2.3100 lr 0.1 img/s 1234 eta 0:12:03``."""
        return self.console.headline()

    def exposition(self) -> str:
        """The registry in Prometheus text format (what the endpoint serves)."""
        return self.prom.exposition()

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Stops the endpoint (releasing the port), removes the port file, closes TensorBoard,
        ``metrics.jsonl`` and the bar. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.prom.close()
        for out in (self._tb, self._jsonl, self.console):
            if out is not None:
                out.close()
        self._tb = self._jsonl = None

    def __enter__(self) -> "MetricsHub":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # best effort: never leave a listening socket behind
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


def hub_from_config(cls, cfg: Any, rank: int, local_rank: int, world_size: int, run_dir: Union[str, Path],
                    **overrides: Any) -> MetricsHub:
    """``MetricsHub.from_config``: a hub from any object or mapping with the constructor's option
    names. Missing options keep their defaults; ``overrides`` win over ``cfg``."""
    names = ("prometheus", "host", "port", "per_rank", "tensorboard", "progress", "total_steps",
             "device", "tensorboard_every", "port_fallback", "initial_step", "jsonl")
    get = cfg.get if isinstance(cfg, Mapping) else (lambda k, d=None: getattr(cfg, k, d))
    kw = {k: get(k) for k in names if get(k) is not None}
    kw.update(overrides)
    return cls(rank, local_rank, world_size, run_dir, **kw)


def _eval_flat(s: str, results: Mapping[str, Any]) -> tuple[dict[str, float], list[str]]:
    """``(flat dict, human-readable parts)`` of one set's evaluation results."""
    flat: dict[str, float] = {}
    shown: list[str] = []
    for k, v in results.items():
        k = str(k)
        if isinstance(v, Mapping) and k.lower() == "tar":
            for far, tv in v.items():
                f = to_float(tv)
                if f is not None:
                    flat[f"eval/{s}/tar@far={far_label(far)}"] = f
                    shown.append(f"tar@far={far_label(far)}={f:.4f}")
            continue
        f = to_float(v)
        if f is None:
            continue
        far = parse_tar_key(k)
        if k.lower() in ("accuracy", "acc"):
            flat[f"eval/{s}/accuracy"] = f
            shown.append(f"accuracy={f:.4f}")
        elif far is not None:
            flat[f"eval/{s}/tar@far={far}"] = f
            shown.append(f"tar@far={far}={f:.4f}")
        else:
            flat[f"eval/{s}/{k}"] = f
            shown.append(f"{k}={f:.4g}")
    return flat, shown

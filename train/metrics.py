"""Training observability: Prometheus metrics, TensorBoard scalars, a progress bar, step timing.

The trainer creates one :class:`MetricsHub` per process, explicitly; nothing happens at import.
Each hub owns its own ``prometheus_client.CollectorRegistry`` (never the global default one), so
several hubs in one process (tests, notebooks) do not collide.

Endpoint design (see docs/observability.md): by default every rank serves its own endpoint on
``host:base_port + local_rank`` (ranks on one node never collide; nodes are told apart by the
scrape target's address), and every series carries a ``rank`` label. The bound port (useful with
port 0 = ephemeral, or after a fallback) is :attr:`MetricsHub.port` and is written to
``run_dir/metrics_rank{rank}.port``. With ``per_rank=False`` only rank 0 serves, on
``base_port``, and only rank-0 values are exported.

Typical use::

    setup_logging(run_dir, rank)
    hub = MetricsHub(rank, local_rank, world, run_dir, port=9400, total_steps=cfg.steps)
    timer = StepTimer(device)
    for step in ...:
        with timer.phase("data"): batch = next(it)
        with timer.phase("forward"): out = model(batch)
        with timer.phase("backward"): out["loss"].backward()
        with timer.phase("optimizer"): opt.step()
        hub.update(step=step, losses=out, lr={"backbone": ..., "head": ...},
                   timings=timer.collect(), images_per_s=..., head_stats=head.last_stats)
    hub.close()
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
import re
import resource
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Union

import torch

from .logging_utils import setup_logging, teardown_logging  # noqa: F401  (re-exported)

__all__ = ["MetricsHub", "StepTimer", "setup_logging", "teardown_logging", "port_file", "PHASES"]

log = logging.getLogger(__name__)

PHASES = ("data", "forward", "backward", "optimizer")
_PHASE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_STATS = ("min", "mean", "max")
# head.last_stats keys with a dedicated series; anything else goes to pfc_head_stat{stat=<key>}
_HEAD_PREFIXES = {"phi_": "phi", "margin_": "margin"}


def port_file(run_dir: Union[str, Path], rank: int) -> Path:
    """Where rank ``rank`` writes the port its metrics endpoint is bound to."""
    return Path(run_dir) / f"metrics_rank{rank}.port"


def _to_float(v: Any) -> Optional[float]:
    """float(v) for numbers and one-element tensors; ``None`` for anything else."""
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return float(v.detach())
    try:
        import numpy as np

        if isinstance(v, np.generic) or (isinstance(v, np.ndarray) and v.size == 1):
            return float(v)
    except ImportError:  # pragma: no cover
        pass
    return None


def _tb_tag(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-/@=]", "_", s)


# --------------------------------------------------------------------------------------------
# Step timing


class StepTimer:
    """Per-phase wall times of one training step, honest on CUDA.

    ``with timer.phase("forward"): ...`` times a phase (a phase entered twice in a step, e.g. with
    gradient accumulation, accumulates); ``timer.collect()`` returns ``{phase: seconds}`` for the
    phases seen since the previous ``collect()`` and starts the next step.

    Modes:
        ``"wall"``: host ``time.perf_counter`` (CPU, or when asynchronous GPU time is acceptable).
        ``"sync"``: ``torch.cuda.synchronize`` at both ends of each phase, then host time. Exact,
            but each phase boundary stalls the host until the GPU is idle.
        ``"events"``: CUDA events recorded on the current stream at both ends of each phase; the
            host is synchronised only once, in ``collect()``. The time is the GPU stream's time
            between the two events.
        ``"auto"`` (default): ``"events"`` on a CUDA device, else ``"wall"``.

    Args:
        device: The training device (``None``/CPU means ``"wall"`` in ``"auto"`` mode).
        mode: See above.
    """

    def __init__(self, device: Union[torch.device, str, None] = None, mode: str = "auto"):
        dev = torch.device(device) if device is not None else torch.device("cpu")
        if mode == "auto":
            mode = "events" if dev.type == "cuda" else "wall"
        if mode not in ("wall", "sync", "events"):
            raise ValueError(f"StepTimer mode must be auto, wall, sync or events, not {mode!r}")
        if mode in ("sync", "events") and (dev.type != "cuda" or not torch.cuda.is_available()):
            raise ValueError(f"StepTimer mode {mode!r} needs an available CUDA device, got {dev}")
        self.device = dev
        self.mode = mode
        self._wall: dict[str, float] = {}
        self._events: list[tuple[str, Any, Any]] = []
        self.last: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Times the body of the ``with`` block as phase ``name``."""
        if self.mode == "events":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record(torch.cuda.current_stream(self.device))
            try:
                yield
            finally:
                end.record(torch.cuda.current_stream(self.device))
                self._events.append((name, start, end))
            return
        if self.mode == "sync":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.mode == "sync":
                torch.cuda.synchronize(self.device)
            self._wall[name] = self._wall.get(name, 0.0) + time.perf_counter() - t0

    def reset(self) -> None:
        """Drops the phases recorded since the previous call without reading them (no device sync:
        the trainer calls it on steps that do not log)."""
        self._wall = {}
        self._events = []

    def collect(self) -> dict[str, float]:
        """``{phase: seconds}`` since the previous call (in first-seen order); resets the timer."""
        out = dict(self._wall)
        if self._events:
            self._events[-1][2].synchronize()
            for name, start, end in self._events:
                out[name] = out.get(name, 0.0) + start.elapsed_time(end) / 1000.0
        self._wall = {}
        self._events = []
        self.last = out
        return out


# --------------------------------------------------------------------------------------------
# Memory


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


# --------------------------------------------------------------------------------------------
# The hub


class MetricsHub:
    """One process's metrics: Prometheus endpoint, TensorBoard (rank 0), progress bar (rank 0).

    Args:
        rank: Global rank (the ``rank`` label of every series).
        local_rank: Rank on this node; the endpoint listens on ``port + local_rank`` when
            ``per_rank`` (and ``port`` is not 0).
        world_size: Number of ranks (exported as ``pfc_world_size``).
        run_dir: Run directory for the port file and ``tensorboard/``; created if missing.
        prometheus: Serve the HTTP endpoint. When off, metrics are still kept in the hub's
            registry (see :meth:`exposition`), just not served.
        host: Address to bind; ``"127.0.0.1"`` (default) is reachable only from this machine,
            ``"0.0.0.0"`` from the network.
        port: Base port; 0 picks a free ephemeral port per rank.
        per_rank: Every rank serves (default); otherwise only rank 0 does, on ``port``.
        tensorboard: Write TensorBoard scalars on rank 0 (a warning and no-op if the
            ``tensorboard`` package is missing).
        progress: Show a tqdm bar on rank 0 (never when stdout is not a TTY).
        total_steps: Total steps, for the bar's ETA.
        device: Device whose memory is reported (default: ``cuda:local_rank`` if CUDA is
            available, else CPU).
        tensorboard_every: Write TensorBoard scalars every this many ``update`` calls.
        port_fallback: When the requested port is taken, bind an ephemeral one (warning) instead
            of raising.
        initial_step: The step a resumed run starts from (so the bar's rate and ETA are right).
    """

    def __init__(
        self,
        rank: int = 0,
        local_rank: int = 0,
        world_size: int = 1,
        run_dir: Union[str, Path] = "runs/default",
        *,
        prometheus: bool = True,
        host: str = "127.0.0.1",
        port: int = 9400,
        per_rank: bool = True,
        tensorboard: bool = True,
        progress: bool = True,
        total_steps: Optional[int] = None,
        device: Union[torch.device, str, None] = None,
        tensorboard_every: int = 1,
        port_fallback: bool = True,
        initial_step: int = 0,
    ):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

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
        self._streak = 0
        self._skipped_since_update = False
        self._records_seen: Optional[float] = None
        self._last_step: Optional[int] = None
        self._last_loss: Optional[float] = None
        self._last_lr: Optional[float] = None
        self._last_ips: Optional[float] = None
        self._rate_origin: Optional[tuple[int, float]] = None  # (step, time) of the first update

        self.registry = CollectorRegistry(auto_describe=True)
        reg, r = self.registry, str(self.rank)
        ProcessCollector(namespace="pfc", registry=reg)

        def gauge(name, doc, *labels):
            g = Gauge(name, doc, ("rank",) + labels, registry=reg)
            return g if labels else g.labels(r)

        def counter(name, doc):
            return Counter(name, doc, ("rank",), registry=reg).labels(r)

        self._world = gauge("pfc_world_size", "Number of ranks in the job.")
        self._world.set(self.world_size)
        self._step = gauge("pfc_step", "Latest optimizer step (global step counter).")
        self._epoch = gauge("pfc_epoch", "Current epoch.")
        self._loss = gauge("pfc_loss", "Latest loss value; term=total is the optimised sum, "
                           "ce/con/ali its terms (unweighted).", "term")
        self._lr = gauge("pfc_learning_rate", "Current learning rate per parameter group.", "group")
        self._ips = gauge("pfc_images_per_second", "Training throughput of this rank (images/s).")
        self._phase = gauge("pfc_step_phase_seconds", "Time of the latest step's phase.", "phase")
        self._phase_hist = Histogram("pfc_step_phase_duration_seconds", "Distribution of step phase "
                                     "times.", ("rank", "phase"), buckets=_PHASE_BUCKETS, registry=reg)
        self._step_time = gauge("pfc_step_seconds", "Wall time of the latest step (sum of phases "
                                "unless given).")
        self._grad_norm = gauge("pfc_grad_norm", "Total gradient norm before clipping.")
        self._loss_scale = gauge("pfc_loss_scale", "Mixed-precision loss scale (1 without AMP scaling).")
        self._skipped = counter("pfc_skipped_steps", "Optimizer steps skipped (non-finite loss or "
                                "gradients).")
        self._streak_g = gauge("pfc_nonfinite_consecutive_steps", "Consecutive non-finite steps "
                               "right now (0 once a finite step follows).")
        self._records = counter("pfc_skipped_records", "Data records skipped by the data layer "
                                "(corrupt, undecodable or filtered).")
        self._phi = gauge("pfc_head_phi", "Concentration (phi) statistics of this rank's class "
                          "shard.", "stat")
        self._margin = gauge("pfc_head_margin", "Additive angular margin applied to the latest "
                             "step's targets.", "stat")
        self._sampled = gauge("pfc_head_sampled_classes", "Classes sampled on this rank's shard "
                              "in the latest step.")
        self._tau = gauge("pfc_head_temperature", "Learnable contrastive temperature tau.")
        self._head_other = gauge("pfc_head_stat", "Other numeric head statistics by key.", "stat")
        self._mem = gauge("pfc_memory_bytes", "Memory: allocated/reserved/peak on CUDA, rss/peak_rss "
                          "of the process.", "kind")
        self._eval_acc = gauge("pfc_eval_accuracy", "Verification accuracy per evaluation set.", "set")
        self._eval_tar = gauge("pfc_eval_tar", "True accept rate at a false accept rate per "
                               "evaluation set.", "set", "far")
        self._eval_other = gauge("pfc_eval_metric", "Other evaluation results.", "set", "metric")
        self._eval_step = gauge("pfc_eval_step", "Step of the latest evaluation of a set.", "set")
        self._updated = gauge("pfc_last_update_timestamp_seconds", "Unix time of the latest update "
                              "(for stall alerts).")

        # Prometheus endpoint
        self.host = host
        self.port: Optional[int] = None
        self.port_path: Optional[Path] = None
        self._server = self._thread = None
        if prometheus and (per_rank or self.rank == 0):
            want = port + self.local_rank if (per_rank and port) else port
            self._start_server(want, port_fallback)

        # TensorBoard (rank 0)
        self._tb = None
        if tensorboard and self.rank == 0:
            self._tb = self._open_tensorboard()

        # progress bar (rank 0, TTY only)
        self._bar = None
        if progress and self.rank == 0 and _isatty(sys.stdout):
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=int(initial_step), file=sys.stdout,
                             dynamic_ncols=True, unit="step", desc="train", leave=True)

    # -- setup helpers --------------------------------------------------------------------------

    @classmethod
    def from_config(cls, cfg: Any, rank: int, local_rank: int, world_size: int,
                    run_dir: Union[str, Path], **overrides: Any) -> "MetricsHub":
        """Builds a hub from any object or mapping with the constructor's option names.

        Missing options keep their defaults; ``overrides`` win over ``cfg``.
        """
        names = ("prometheus", "host", "port", "per_rank", "tensorboard", "progress", "total_steps",
                 "device", "tensorboard_every", "port_fallback", "initial_step")
        get = cfg.get if isinstance(cfg, Mapping) else (lambda k, d=None: getattr(cfg, k, d))
        kw = {k: get(k) for k in names if get(k) is not None}
        kw.update(overrides)
        return cls(rank, local_rank, world_size, run_dir, **kw)

    def _start_server(self, port: int, fallback: bool) -> None:
        from prometheus_client import start_http_server

        try:
            res = start_http_server(port, addr=self.host, registry=self.registry)
        except OSError as e:
            if not fallback or port == 0:
                raise
            log.warning("metrics port %s:%d unavailable (%s); binding an ephemeral port instead",
                        self.host, port, e)
            res = start_http_server(0, addr=self.host, registry=self.registry)
        if not isinstance(res, tuple):  # pragma: no cover - prometheus_client < 0.17
            raise RuntimeError("prometheus_client >= 0.17 is needed (start_http_server must return "
                               "the server so that it can be shut down)")
        self._server, self._thread = res
        self.port = int(self._server.server_address[1])
        self.port_path = port_file(self.run_dir, self.rank)
        tmp = self.port_path.with_suffix(".port.tmp")
        tmp.write_text(f"{self.port}\n")
        os.replace(tmp, self.port_path)  # atomic: a reader never sees a half-written file
        log.info("metrics endpoint: http://%s:%d/metrics (rank %d)", self.host, self.port, self.rank)

    def _open_tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            warnings.warn(f"TensorBoard logging is off: the 'tensorboard' package is not installed "
                          f"({e}). pip install tensorboard to enable it.", RuntimeWarning, stacklevel=3)
            return None
        return SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    @property
    def url(self) -> Optional[str]:
        """The metrics URL of this rank's endpoint, or ``None`` when it serves none."""
        return None if self.port is None else f"http://{self.host}:{self.port}/metrics"

    @property
    def tensorboard_enabled(self) -> bool:
        return self._tb is not None

    @property
    def progress_enabled(self) -> bool:
        return self._bar is not None

    # -- updates -------------------------------------------------------------------------------

    def update(
        self,
        *,
        step: Optional[int] = None,
        epoch: Optional[float] = None,
        losses: Optional[Mapping[str, Any]] = None,
        lr: Union[Mapping[str, Any], float, None] = None,
        timings: Optional[Mapping[str, float]] = None,
        images_per_s: Optional[float] = None,
        grad_norm: Any = None,
        loss_scale: Any = None,
        head_stats: Optional[Mapping[str, Any]] = None,
        skipped_records: Optional[int] = None,
        consecutive_nonfinite: Optional[int] = None,
        memory: bool = True,
    ) -> None:
        """Sets the latest values; every argument is optional.

        Args:
            step, epoch: Counters.
            losses: ``{"loss"|"total": ..., "ce": ..., "con": ..., "ali": ...}`` (floats or
                one-element tensors; the head's output dict works as is). Pass floats to avoid a
                device synchronisation.
            lr: ``{"backbone": ..., "head": ...}``, or one float (group ``"all"``).
            timings: ``{phase: seconds}`` as from :meth:`StepTimer.collect`; ``"step"`` or
                ``"total"`` gives the step time, otherwise the phases are summed.
            images_per_s: Throughput of this rank.
            grad_norm, loss_scale: Floats (non-finite values are exported as they are).
            head_stats: The head's ``last_stats``; phi_*/margin_* map to ``pfc_head_phi`` /
                ``pfc_head_margin{stat}``, ``num_sampled_local`` and ``tau`` to their gauges,
                any other numeric key to ``pfc_head_stat{stat=<key>}``; non-numbers are ignored.
            skipped_records: The data layer's cumulative skipped-record count; the counter grows
                by the difference (a smaller value means the data layer restarted counting).
            consecutive_nonfinite: Set the non-finite streak explicitly. Otherwise it is reset to
                0 by an update whose total loss is finite and that follows no
                :meth:`inc_skipped_steps` call.
            memory: Refresh ``pfc_memory_bytes``.
        """
        if self._closed:
            return
        tb: dict[str, float] = {}
        with self._lock:
            if step is not None:
                self._last_step = int(step)
                self._step.set(step)
            if epoch is not None:
                self._epoch.set(epoch)
                tb["train/epoch"] = float(epoch)

            total = None
            for k, v in (losses or {}).items():
                f = _to_float(v)
                if f is None:
                    continue
                term = "total" if k in ("loss", "total") else str(k)
                if term == "total":
                    total = f
                self._loss.labels(str(self.rank), term).set(f)
                tb[f"loss/{term}"] = f

            if lr is not None:
                groups = lr if isinstance(lr, Mapping) else {"all": lr}
                for g, v in groups.items():
                    f = _to_float(v)
                    if f is not None:
                        self._lr.labels(str(self.rank), str(g)).set(f)
                        tb[f"lr/{g}"] = f

            if timings:
                step_t = None
                phase_sum = 0.0
                for ph, v in timings.items():
                    f = _to_float(v)
                    if f is None:
                        continue
                    if ph in ("step", "total"):
                        step_t = f
                        continue
                    phase_sum += f
                    self._phase.labels(str(self.rank), ph).set(f)
                    self._phase_hist.labels(str(self.rank), ph).observe(f)
                    tb[f"time/{ph}_s"] = f
                step_t = phase_sum if step_t is None else step_t
                self._step_time.set(step_t)
                tb["time/step_s"] = step_t

            for gauge_, v, tag in ((self._ips, images_per_s, "perf/images_per_s"),
                                   (self._grad_norm, grad_norm, "train/grad_norm"),
                                   (self._loss_scale, loss_scale, "train/loss_scale")):
                f = _to_float(v) if v is not None else None
                if f is not None:
                    gauge_.set(f)
                    tb[tag] = f

            if head_stats:
                tb.update(self._set_head_stats(head_stats))

            if skipped_records is not None:
                self._set_skipped_records(skipped_records)

            if consecutive_nonfinite is not None:
                self._streak = int(consecutive_nonfinite)
            elif not self._skipped_since_update and total is not None and math.isfinite(total):
                self._streak = 0
            self._skipped_since_update = False
            self._streak_g.set(self._streak)

            if memory:
                for kind, b in memory_stats(self.device).items():
                    self._mem.labels(str(self.rank), kind).set(b)
                    tb[f"memory/{kind}_gib"] = b / 2**30

            now = time.time()
            self._updated.set(now)
            self._updates += 1
            if step is not None and self._rate_origin is None:
                self._rate_origin = (int(step), now)
            if total is not None:
                self._last_loss = total
            if lr is not None:
                first = next(iter(lr.values()), None) if isinstance(lr, Mapping) else lr
                self._last_lr = _to_float(first) if first is not None else self._last_lr
            if images_per_s is not None:
                self._last_ips = _to_float(images_per_s)

        if self._tb is not None and (self._updates - 1) % self.tensorboard_every == 0:
            gstep = self._last_step if self._last_step is not None else self._updates
            for tag, f in tb.items():
                self._tb.add_scalar(_tb_tag(tag), f, gstep)
        if self._bar is not None:
            self._refresh_bar(step, total, lr, images_per_s)

    def _set_head_stats(self, stats: Mapping[str, Any]) -> dict[str, float]:
        tb = {}
        r = str(self.rank)
        for k, v in stats.items():
            f = _to_float(v)
            if f is None:
                continue
            k = str(k)
            for prefix, fam in _HEAD_PREFIXES.items():
                if k.startswith(prefix):
                    (self._phi if fam == "phi" else self._margin).labels(r, k[len(prefix):]).set(f)
                    break
            else:
                if k == "num_sampled_local":
                    self._sampled.set(f)
                elif k == "tau":
                    self._tau.set(f)
                else:
                    self._head_other.labels(r, k).set(f)
            tb[f"head/{k}"] = f
        return tb

    def _set_skipped_records(self, total: float) -> None:
        total = float(total)
        prev = self._records_seen
        delta = total if (prev is None or total < prev) else total - prev
        if delta > 0:
            self._records.inc(delta)
        self._records_seen = total

    def inc_skipped_steps(self, n: int = 1) -> None:
        """Counts ``n`` skipped (non-finite) optimizer steps and extends the non-finite streak."""
        if self._closed:
            return
        with self._lock:
            self._skipped.inc(n)
            self._streak += n
            self._skipped_since_update = True
            self._streak_g.set(self._streak)

    def inc_skipped_records(self, n: int = 1) -> None:
        """Counts ``n`` records skipped by the data layer (alternative to ``skipped_records=``)."""
        if self._closed or n <= 0:
            return
        with self._lock:
            self._records.inc(n)
            if self._records_seen is not None:
                self._records_seen += n

    @property
    def consecutive_nonfinite(self) -> int:
        """The current non-finite streak (what ``pfc_nonfinite_consecutive_steps`` shows)."""
        return self._streak

    def record_eval(self, set_name: str, results: Mapping[str, Any], step: Optional[int] = None) -> None:
        """Exports one evaluation set's results.

        ``results`` keys: ``accuracy``/``acc`` → ``pfc_eval_accuracy{set}``; ``tar@far=1e-4``
        (also ``tar@far1e-4``, ``tar@1e-4``, ``tar_at_far_1e-4``) or a nested ``{"tar": {far: v}}``
        → ``pfc_eval_tar{set,far}``; any other number → ``pfc_eval_metric{set,metric}``.
        """
        if self._closed:
            return
        r, s = str(self.rank), str(set_name)
        step = self._last_step if step is None else int(step)
        tb: dict[str, float] = {}
        shown: list[str] = []
        with self._lock:
            for k, v in results.items():
                k = str(k)
                if isinstance(v, Mapping) and k.lower() == "tar":
                    for far, tv in v.items():
                        f = _to_float(tv)
                        if f is not None:
                            self._eval_tar.labels(r, s, _far_label(far)).set(f)
                            tb[f"eval/{s}/tar@far={_far_label(far)}"] = f
                            shown.append(f"tar@far={_far_label(far)}={f:.4f}")
                    continue
                f = _to_float(v)
                if f is None:
                    continue
                far = _parse_tar_key(k)
                if k.lower() in ("accuracy", "acc"):
                    self._eval_acc.labels(r, s).set(f)
                    tb[f"eval/{s}/accuracy"] = f
                    shown.append(f"accuracy={f:.4f}")
                elif far is not None:
                    self._eval_tar.labels(r, s, far).set(f)
                    tb[f"eval/{s}/tar@far={far}"] = f
                    shown.append(f"tar@far={far}={f:.4f}")
                else:
                    self._eval_other.labels(r, s, k).set(f)
                    tb[f"eval/{s}/{k}"] = f
                    shown.append(f"{k}={f:.4g}")
            if step is not None:
                self._eval_step.labels(r, s).set(step)
        if self._tb is not None:
            for tag, f in tb.items():
                self._tb.add_scalar(_tb_tag(tag), f, step or 0)
            self._tb.flush()
        log.info("eval %s at step %s: %s", s, step, ", ".join(shown))

    # -- output --------------------------------------------------------------------------------

    def eta_seconds(self) -> Optional[float]:
        """Seconds left to ``total_steps`` at the average rate since the first update, or None."""
        if self.total_steps is None or self._rate_origin is None or self._last_step is None:
            return None
        s0, t0 = self._rate_origin
        done, elapsed = self._last_step - s0, time.time() - t0
        if done <= 0 or elapsed <= 0:
            return None
        return max(0.0, (self.total_steps - self._last_step) * elapsed / done)

    def headline(self) -> str:
        """One log line with the headline figures (for logs when the bar is off, e.g. Slurm):
        ``step 120/1000 loss 2.3100 lr 0.1 img/s 1234 eta 0:12:03``."""
        parts = []
        if self._last_step is not None:
            parts.append(f"step {self._last_step}" + (f"/{self.total_steps}" if self.total_steps else ""))
        if self._last_loss is not None:
            parts.append(f"loss {self._last_loss:.4f}")
        if self._last_lr is not None:
            parts.append(f"lr {self._last_lr:.3g}")
        if self._last_ips is not None:
            parts.append(f"img/s {self._last_ips:.0f}")
        eta = self.eta_seconds()
        if eta is not None:
            parts.append(f"eta {datetime.timedelta(seconds=int(eta))}")
        return " ".join(parts)

    def _refresh_bar(self, step, total, lr, ips) -> None:
        bar = self._bar
        if step is not None:
            bar.update(max(0, int(step) - bar.n))
        post = {}
        if total is not None:
            post["loss"] = f"{total:.4f}"
        if lr is not None:
            first = next(iter(lr.values())) if isinstance(lr, Mapping) and lr else lr
            f = _to_float(first)
            if f is not None:
                post["lr"] = f"{f:.3g}"
        if ips is not None:
            post["img/s"] = f"{float(ips):.0f}"
        if post:
            bar.set_postfix(post, refresh=True)

    def exposition(self) -> str:
        """The registry in Prometheus text format (what the endpoint serves)."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode("utf-8")

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Stops the endpoint (releasing the port), removes the port file, closes TensorBoard and
        the bar. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            if self._thread is not None:
                self._thread.join(timeout=5)
            self._server = self._thread = None
            if self.port_path is not None:
                with contextlib.suppress(OSError):
                    self.port_path.unlink()
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "MetricsHub":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # best effort: never leave a listening socket behind
        with contextlib.suppress(Exception):
            self.close()


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _far_label(far: Any) -> str:
    f = _to_float(far)
    if f is None:
        return str(far)
    mant, exp = f"{f:.3e}".split("e")
    mant = mant.rstrip("0").rstrip(".")
    return f"{mant}e{int(exp)}"


_TAR_RE = re.compile(r"^tar(?:@|_at_)(?:far)?[=_]?(.+)$", re.IGNORECASE)


def _parse_tar_key(key: str) -> Optional[str]:
    m = _TAR_RE.match(key)
    if not m:
        return None
    raw = m.group(1)
    try:
        return _far_label(float(raw))
    except ValueError:
        return raw

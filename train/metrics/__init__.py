"""Training observability: Prometheus metrics, TensorBoard scalars, a progress bar, ``metrics.jsonl``,
step timing.

The trainer creates one :class:`MetricsHub` per process, explicitly; nothing happens at import.
Each hub owns its own ``prometheus_client.CollectorRegistry`` (never the global default one), so
several hubs in one process (tests, notebooks) do not collide.

A logged step is one flat dict (``{"step": 120, "loss/total": 2.31, "lr/backbone": 0.1, ...}``);
its keys, the Prometheus names and help texts are declared once in :mod:`.series`. The loggers
consume it: :mod:`.prometheus`, :mod:`.tensorboard`, :mod:`.console` (bar, headline), :mod:`.jsonl`.
:mod:`.timing` has the :class:`StepTimer`, :mod:`.memory` the memory figures.

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

import time  # noqa: F401  (tests patch train.metrics.time.time)

from ..logging_utils import setup_logging, teardown_logging  # noqa: F401  (re-exported)
from .hub import MetricsHub, step_metrics
from .memory import cuda_allocator_stats, memory_stats
from .prometheus import port_file
from .series import PHASES, SERIES, Series
from .timing import StepTimer

__all__ = ["MetricsHub", "StepTimer", "setup_logging", "teardown_logging", "port_file", "PHASES", "SERIES",
           "Series", "memory_stats", "cuda_allocator_stats", "step_metrics"]

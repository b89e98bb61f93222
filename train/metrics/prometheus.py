"""The Prometheus side of the metrics: a private registry holding every series of the table
(:mod:`train.metrics.series`), fed from flat dicts, optionally served over HTTP."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Mapping, Optional, Union

from .series import PHASE_BUCKETS, SERIES, match

log = logging.getLogger("train.metrics")

__all__ = ["PrometheusLogger", "port_file"]


def port_file(run_dir: Union[str, Path], rank: int) -> Path:
    """Where rank ``rank`` writes the port its metrics endpoint is bound to."""
    return Path(run_dir) / f"metrics_rank{rank}.port"


class PrometheusLogger:
    """Every series of :data:`SERIES` in one ``CollectorRegistry`` (never the global default one, so
    several hubs in one process do not collide), with the ``rank`` label.

    Gauges are set, histograms observe, counters grow by the increase of the flat (cumulative)
    value (a smaller value means the source restarted counting: it grows by the value).
    """

    def __init__(self, rank: int) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

        self.rank = str(rank)
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(namespace="pfc", registry=self.registry)
        self._metrics = {}
        for s in SERIES:
            labels = ("rank",) + s.labels
            if s.kind == "histogram":
                m = Histogram(s.prom, s.help, labels, buckets=PHASE_BUCKETS, registry=self.registry)
            elif s.kind == "counter":
                m = Counter(s.prom, s.help, labels, registry=self.registry)
            else:
                m = Gauge(s.prom, s.help, labels, registry=self.registry)
            self._metrics[s.prom] = m
            if not s.labels and s.initial is not None:
                m.labels(self.rank)  # exported from the start (0), as dashboards expect
        self._counted: dict[tuple, float] = {}
        self.host: Optional[str] = None
        self.port: Optional[int] = None
        self.port_path: Optional[Path] = None
        self._server = self._thread = None

    def write(self, flat: Mapping[str, float]) -> None:
        for key, value in flat.items():
            for s, labels in match(key):
                child = self._metrics[s.prom].labels(self.rank, *(labels[n] for n in s.labels))
                if s.kind == "histogram":
                    child.observe(value)
                elif s.kind == "counter":
                    seen = self._counted.get((s.prom, key))
                    delta = value if (seen is None or value < seen) else value - seen
                    if delta > 0:
                        child.inc(delta)
                    self._counted[(s.prom, key)] = value
                else:
                    child.set(value)

    def serve(self, host: str, port: int, fallback: bool, run_dir: Path) -> None:
        """Serves the registry on ``host:port`` (an ephemeral port when taken and ``fallback``) and
        writes the bound port to :func:`port_file` (atomically)."""
        from prometheus_client import start_http_server

        self.host = host
        try:
            res = start_http_server(port, addr=host, registry=self.registry)
        except OSError as e:
            if not fallback or port == 0:
                raise
            log.warning("metrics port %s:%d unavailable (%s); binding an ephemeral port instead", host, port, e)
            res = start_http_server(0, addr=host, registry=self.registry)
        if not isinstance(res, tuple):  # pragma: no cover - prometheus_client < 0.17
            raise RuntimeError("prometheus_client >= 0.17 is needed (start_http_server must return "
                               "the server so that it can be shut down)")
        self._server, self._thread = res
        self.port = int(self._server.server_address[1])
        self.port_path = port_file(run_dir, int(self.rank))
        tmp = self.port_path.with_suffix(".port.tmp")
        tmp.write_text(f"{self.port}\n")
        os.replace(tmp, self.port_path)  # atomic: a reader never sees a half-written file
        log.info("metrics endpoint: http://%s:%d/metrics (rank %s)", host, self.port, self.rank)

    def exposition(self) -> str:
        """The registry in Prometheus text format (what the endpoint serves)."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode("utf-8")

    def close(self) -> None:
        """Stops the endpoint (releasing the port) and removes the port file."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None
        if self.port_path is not None:
            try:
                self.port_path.unlink()
            except OSError:
                pass

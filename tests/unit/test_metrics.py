"""Observability: a real Prometheus endpoint on 127.0.0.1 scraped over HTTP, the port file,
per-rank ports, logging files, StepTimer, TensorBoard events and the progress bar."""

from __future__ import annotations

import importlib.util
import io
import logging
import math
import re
import socket
import time
import urllib.request

import pytest
import torch

from train.logging_utils import log_path, setup_logging, teardown_logging
from train.metrics import MetricsHub, StepTimer, port_file

pytestmark = pytest.mark.timeout(60)

_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse(text: str) -> dict[tuple[str, frozenset], float]:
    """Exposition text -> {(name, frozenset(labels.items())): value}; also checks HELP/TYPE."""
    out, helps, types = {}, set(), {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            helps.add(line.split()[2])
        elif line.startswith("# TYPE "):
            _, _, name, typ = line.split()
            types[name] = typ
        elif line and not line.startswith("#"):
            m = _LINE.match(line)
            assert m, f"unparseable exposition line: {line!r}"
            name, labels, value = m.groups()
            out[(name, frozenset(_LABEL.findall(labels or "")))] = float(value)
    for name in types:
        assert name in helps, f"{name} has no HELP text"
    parse.types = types
    return out


def scrape(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        return parse(r.read().decode())


def value(samples: dict, name: str, **labels) -> float:
    want = frozenset((k, str(v)) for k, v in labels.items())
    hits = [v for (n, ls), v in samples.items() if n == name and want <= ls]
    assert len(hits) == 1, f"{name}{labels}: {len(hits)} matches"
    return hits[0]


def port_is_free(port: int) -> bool:
    """Whether a server could listen on the port now (SO_REUSEADDR like every HTTP server, so a
    closed connection's TIME_WAIT does not count as "taken")."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def make_hub(tmp_path, **kw) -> MetricsHub:
    kw.setdefault("port", 0)
    kw.setdefault("tensorboard", False)
    kw.setdefault("progress", False)
    kw.setdefault("device", "cpu")
    rank = kw.pop("rank", 0)
    local_rank = kw.pop("local_rank", rank)
    return MetricsHub(rank, local_rank, kw.pop("world_size", 2), tmp_path, **kw)


def test_endpoint_scrape_names_labels_values_and_port_release(tmp_path):
    hub = make_hub(tmp_path, rank=1, local_rank=1)
    try:
        assert hub.host == "127.0.0.1" and hub.port and hub.port > 0
        assert port_file(tmp_path, 1).read_text().strip() == str(hub.port)
        hub.update(step=12, epoch=3, losses={"loss": torch.tensor(2.5), "ce": 2.0, "con": 0.25, "ali": 0.125},
                   lr={"backbone": 0.1, "head": 0.2}, images_per_s=1234.5, grad_norm=7.0, loss_scale=65536.0,
                   timings={"data": 0.01, "forward": 0.02, "backward": 0.04, "optimizer": 0.005},
                   head_stats={"phi_min": 0.1, "phi_mean": 0.3, "phi_max": 0.9, "margin_min": 0.4,
                               "margin_mean": 0.5, "margin_max": 0.6, "num_sampled_local": 150.0,
                               "tau": 0.07, "phi_known": 42.0, "novel_key": 3.0, "not_a_number": "x"},
                   skipped_records=5)
        hub.inc_skipped_steps()
        hub.update(skipped_records=8)
        hub.record_eval("lfw", {"accuracy": 0.995, "tar@far=1e-4": 0.91, "tar": {1e-6: 0.8}, "auc": 0.99})
        s = scrape(hub.url)
        types = parse.types

        r = {"rank": 1}
        assert value(s, "pfc_step", **r) == 12
        assert value(s, "pfc_epoch", **r) == 3
        assert value(s, "pfc_world_size", **r) == 2
        for term, v in {"total": 2.5, "ce": 2.0, "con": 0.25, "ali": 0.125}.items():
            assert value(s, "pfc_loss", term=term, **r) == v
        assert value(s, "pfc_learning_rate", group="backbone", **r) == 0.1
        assert value(s, "pfc_learning_rate", group="head", **r) == 0.2
        assert value(s, "pfc_images_per_second", **r) == 1234.5
        assert value(s, "pfc_grad_norm", **r) == 7.0
        assert value(s, "pfc_loss_scale", **r) == 65536.0
        assert value(s, "pfc_step_phase_seconds", phase="backward", **r) == 0.04
        assert value(s, "pfc_step_seconds", **r) == pytest.approx(0.075)
        assert value(s, "pfc_step_phase_duration_seconds_count", phase="forward", **r) == 1
        assert value(s, "pfc_step_phase_duration_seconds_bucket", phase="forward", le="0.025", **r) == 1
        assert types["pfc_step_phase_duration_seconds"] == "histogram"
        assert value(s, "pfc_skipped_steps_total", **r) == 1
        assert types["pfc_skipped_steps_total"] == "counter"
        assert value(s, "pfc_nonfinite_consecutive_steps", **r) == 1
        assert value(s, "pfc_skipped_records_total", **r) == 8
        for stat, v in {"min": 0.1, "mean": 0.3, "max": 0.9, "known": 42.0}.items():
            assert value(s, "pfc_head_phi", stat=stat, **r) == v
        for stat, v in {"min": 0.4, "mean": 0.5, "max": 0.6}.items():
            assert value(s, "pfc_head_margin", stat=stat, **r) == v
        assert value(s, "pfc_head_sampled_classes", **r) == 150
        assert value(s, "pfc_head_temperature", **r) == 0.07
        assert value(s, "pfc_head_stat", stat="novel_key", **r) == 3.0
        assert value(s, "pfc_memory_bytes", kind="rss", **r) > 1e6
        assert value(s, "pfc_eval_accuracy", set="lfw", **r) == 0.995
        assert value(s, "pfc_eval_tar", set="lfw", far="1e-4", **r) == 0.91
        assert value(s, "pfc_eval_tar", set="lfw", far="1e-6", **r) == 0.8
        assert value(s, "pfc_eval_metric", set="lfw", metric="auc", **r) == 0.99
        assert value(s, "pfc_eval_step", set="lfw", **r) == 12
        assert abs(value(s, "pfc_last_update_timestamp_seconds", **r) - time.time()) < 60
        # every pfc_ series carries the rank label
        for name, labels in s:
            if name.startswith("pfc_"):
                assert ("rank", "1") in labels or name.startswith("pfc_process_"), name
    finally:
        port = hub.port
        hub.close()
    assert port_is_free(port)
    assert not port_file(tmp_path, 1).exists()
    again = make_hub(tmp_path, rank=1, local_rank=0, port=port, port_fallback=False)  # rebinds it
    assert again.port == port
    again.close()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
    hub.close()  # idempotent
    hub.update(step=13)  # no-op after close


def test_nonfinite_streak_resets_on_a_finite_update(tmp_path):
    hub = make_hub(tmp_path, prometheus=False)
    hub.inc_skipped_steps()
    hub.update(step=1, losses={"loss": math.nan})
    hub.inc_skipped_steps()
    hub.update(step=2, losses={"loss": 1.0})  # update of the skipped step itself: streak stays
    assert hub.consecutive_nonfinite == 2
    hub.update(step=3, losses={"loss": 1.0})
    assert hub.consecutive_nonfinite == 0
    s = parse(hub.exposition())
    assert value(s, "pfc_skipped_steps_total") == 2
    assert value(s, "pfc_nonfinite_consecutive_steps") == 0
    hub.update(consecutive_nonfinite=4)
    assert value(parse(hub.exposition()), "pfc_nonfinite_consecutive_steps") == 4
    # skipped records: the data layer's cumulative count; a drop means it restarted counting
    hub.update(skipped_records=3)
    hub.update(skipped_records=1)
    hub.inc_skipped_records(2)
    assert value(parse(hub.exposition()), "pfc_skipped_records_total") == 6
    assert hub.port is None and hub.url is None
    hub.close()


def test_headline_for_non_tty_logs(tmp_path, monkeypatch):
    hub = make_hub(tmp_path, prometheus=False, total_steps=100)
    clock = [1000.0]
    monkeypatch.setattr("train.metrics.time.time", lambda: clock[0])
    hub.update(step=10, losses={"loss": 2.0}, lr={"backbone": 0.1, "head": 0.2}, images_per_s=512.0)
    clock[0] += 20.0
    hub.update(step=20, losses={"loss": 1.5})
    assert hub.eta_seconds() == pytest.approx(160.0)
    assert hub.headline() == "step 20/100 loss 1.5000 lr 0.1 img/s 512 eta 0:02:40"
    hub.close()


def test_two_hubs_in_one_process_do_not_collide(tmp_path):
    a = make_hub(tmp_path / "a", rank=0)
    b = make_hub(tmp_path / "b", rank=1)
    try:
        assert a.port != b.port and a.registry is not b.registry
        a.update(step=1, losses={"loss": 1.0})
        b.update(step=2, losses={"loss": 2.0})
        sa, sb = scrape(a.url), scrape(b.url)
        assert value(sa, "pfc_step", rank=0) == 1 and value(sb, "pfc_step", rank=1) == 2
        assert not any(("rank", "1") in ls for _, ls in sa)
        assert not any(("rank", "0") in ls for _, ls in sb)
        # the default global registry is untouched
        from prometheus_client import REGISTRY, generate_latest

        assert b"pfc_step" not in generate_latest(REGISTRY)
    finally:
        a.close()
        b.close()


def test_per_rank_ports_and_fallback(tmp_path):
    # find two consecutive free ports for base and base+1
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        base = s.getsockname()[1]
    if not (port_is_free(base) and port_is_free(base + 1)):
        pytest.skip("no two consecutive free ports")
    h0 = make_hub(tmp_path, rank=2, local_rank=0, port=base)
    h1 = make_hub(tmp_path, rank=3, local_rank=1, port=base)
    h1b = make_hub(tmp_path / "again", rank=3, local_rank=1, port=base)  # taken: ephemeral fallback
    try:
        assert (h0.port, h1.port) == (base, base + 1)
        assert h1b.port not in (base, base + 1)
        assert port_file(tmp_path, 2).read_text().strip() == str(base)
        assert port_file(tmp_path, 3).read_text().strip() == str(base + 1)
        with pytest.raises(OSError):
            make_hub(tmp_path / "strict", rank=3, local_rank=1, port=base, port_fallback=False)
    finally:
        for h in (h0, h1, h1b):
            h.close()
    # per_rank=False: only rank 0 serves
    r1 = make_hub(tmp_path / "agg", rank=1, local_rank=1, per_rank=False)
    assert r1.port is None and not port_file(tmp_path / "agg", 1).exists()
    r1.close()


def test_from_config_reads_attributes_and_mappings(tmp_path):
    class Cfg:
        prometheus = False
        tensorboard = False
        progress = False
        port = 1234

    hub = MetricsHub.from_config(Cfg(), 0, 0, 1, tmp_path, device="cpu")
    assert hub.port is None and not hub.tensorboard_enabled and not hub.progress_enabled
    hub.close()
    hub = MetricsHub.from_config({"port": 0, "tensorboard": False, "progress": False}, 0, 0, 1,
                                 tmp_path, device="cpu")
    assert hub.port > 0
    hub.close()


def test_setup_logging_writes_rank_files(tmp_path):
    console = io.StringIO()
    try:
        path = setup_logging(tmp_path, 0, stream=console)
        logging.getLogger("train.test").info("hello from rank zero")
        assert path == log_path(tmp_path, 0) and path.name == "train_rank0.log"
        assert "[rank 0] INFO train.test: hello from rank zero" in path.read_text()
        assert "hello from rank zero" in console.getvalue()

        console1 = io.StringIO()
        path1 = setup_logging(tmp_path, 1, stream=console1)  # replaces rank 0's handlers
        logging.getLogger("train.test").info("quiet line")
        logging.getLogger("train.test").error("loud line")
        text1 = path1.read_text()
        assert "[rank 1] INFO train.test: quiet line" in text1 and "loud line" in text1
        assert "quiet line" not in console1.getvalue() and "loud line" in console1.getvalue()
        assert "quiet line" not in path.read_text()
        assert len([h for h in logging.getLogger().handlers if getattr(h, "_pfc_handler", False)]) == 2
    finally:
        teardown_logging()
    assert not [h for h in logging.getLogger().handlers if getattr(h, "_pfc_handler", False)]


def test_step_timer_phases_sum_sensibly():
    timer = StepTimer("cpu")
    assert timer.mode == "wall"
    t0 = time.perf_counter()
    with timer.phase("data"):
        time.sleep(0.02)
    with timer.phase("forward"):
        time.sleep(0.01)
    with timer.phase("backward"):
        time.sleep(0.01)
    with timer.phase("backward"):  # accumulates
        time.sleep(0.01)
    with timer.phase("optimizer"):
        pass
    wall = time.perf_counter() - t0
    t = timer.collect()
    assert list(t) == ["data", "forward", "backward", "optimizer"]
    assert t["data"] >= 0.019 and t["forward"] >= 0.009 and t["backward"] >= 0.019
    assert 0 <= t["optimizer"] < 0.01
    assert sum(t.values()) <= wall + 1e-6
    assert timer.collect() == {}  # reset after collect
    with pytest.raises(ValueError):
        StepTimer("cpu", mode="bogus")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError):
            StepTimer("cpu", mode="events")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["events", "sync"])
def test_step_timer_cuda(mode):
    timer = StepTimer("cuda", mode=mode)
    x = torch.randn(2048, 2048, device="cuda")
    with timer.phase("forward"):
        for _ in range(10):
            x = x @ x
            x = x / x.norm()
    t = timer.collect()
    assert t["forward"] > 0


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                    reason="tensorboard is not installed (optional; pip install tensorboard==2.21.0)")
def test_tensorboard_event_file_on_rank0_only(tmp_path):
    hub = make_hub(tmp_path, prometheus=False, tensorboard=True)
    other = make_hub(tmp_path / "r1", rank=1, prometheus=False, tensorboard=True)
    assert hub.tensorboard_enabled and not other.tensorboard_enabled
    hub.update(step=1, losses={"loss": 1.5, "ce": 1.0}, lr={"backbone": 0.1})
    hub.record_eval("lfw", {"accuracy": 0.9})
    hub.close()
    other.close()
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    assert not (tmp_path / "r1" / "tensorboard").exists()


def test_tensorboard_missing_is_a_warning_and_noop(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name.startswith("torch.utils.tensorboard") or name.startswith("tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.warns(RuntimeWarning, match="tensorboard"):
        hub = make_hub(tmp_path, prometheus=False, tensorboard=True)
    assert not hub.tensorboard_enabled
    hub.update(step=1, losses={"loss": 1.0})
    hub.close()


def test_progress_bar_disabled_without_tty(tmp_path, capsys):
    hub = make_hub(tmp_path, prometheus=False, progress=True, total_steps=10)
    assert not hub.progress_enabled  # pytest's captured stdout is not a TTY
    for step in range(1, 4):
        hub.update(step=step, losses={"loss": 1.0}, lr={"backbone": 0.1}, images_per_s=100.0)
    hub.close()
    assert "img/s" not in capsys.readouterr().out


def test_progress_bar_on_a_tty(tmp_path, monkeypatch):
    class FakeTTY(io.StringIO):
        def isatty(self):
            return True

    out = FakeTTY()
    monkeypatch.setattr("sys.stdout", out)
    with make_hub(tmp_path, prometheus=False, progress=True, total_steps=10) as hub:
        assert hub.progress_enabled
        for step in range(1, 4):
            hub.update(step=step, losses={"loss": 1.25}, lr={"backbone": 0.1}, images_per_s=100.0)
    text = out.getvalue()
    assert "3/10" in text and "loss=1.2500" in text and "img/s=100" in text
    # rank != 0 never shows a bar
    hub1 = make_hub(tmp_path, rank=1, prometheus=False, progress=True)
    assert not hub1.progress_enabled
    hub1.close()


def test_import_has_no_side_effects():
    import subprocess
    import sys

    code = ("import threading, logging; n = threading.active_count(); import train.metrics;"
            "assert threading.active_count() == n; assert not logging.getLogger().handlers; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr

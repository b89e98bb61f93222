"""metrics.jsonl (rank 0) and the series table: one JSON object per logged step, readable by a
plot script; every flat key the trainer produces is declared once."""

from __future__ import annotations

import json
import math

import pytest

from train.metrics import SERIES, MetricsHub, step_metrics
from train.metrics.series import match

pytestmark = pytest.mark.timeout(60)


def _hub(tmp_path, rank=0):
    return MetricsHub(rank, rank, 2, tmp_path, prometheus=False, tensorboard=False, progress=False, device="cpu")


def test_one_line_per_logged_step_and_eval(tmp_path):
    with _hub(tmp_path) as hub:
        hub.update(step=10, epoch=0, losses={"loss": 2.5, "ce": 2.0}, lr={"backbone": 0.1, "head": 0.2},
                   timings={"data": 0.01, "forward": 0.02}, images_per_s=100.0, grad_norm=float("nan"),
                   head_stats={"phi_mean": 0.4, "num_sampled_local": 7, "note": "text"})
        hub.inc_skipped_steps()
        hub.update(step=20, losses={"loss": 1.5})
        hub.record_eval("lfw", {"accuracy": 0.9, "tar": {1e-4: 0.8}}, step=20)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["step"] for r in rows] == [10, 20, 20]
    a, b, ev = rows
    assert a["loss/total"] == 2.5 and a["loss/ce"] == 2.0 and a["lr/head"] == 0.2
    assert a["time/forward_s"] == 0.02 and a["time/step_s"] == pytest.approx(0.03)
    assert math.isnan(a["train/grad_norm"]) and a["head/phi_mean"] == 0.4 and "head/note" not in a
    assert a["memory/rss_bytes"] > 0 and "memory/cuda_ooms" not in a  # CPU: no allocator figures
    assert b["train/skipped_steps"] == 1 and b["train/nonfinite_consecutive"] == 1  # the update follows a skip
    assert ev == {"step": 20, "eval/lfw/accuracy": 0.9, "eval/lfw/tar@far=1e-4": 0.8, "eval/lfw/step": 20.0,
                  "time": ev["time"]}
    # a resumed run appends
    with _hub(tmp_path) as hub:
        hub.update(step=21, losses={"loss": 1.0})
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 4


def test_only_rank0_writes(tmp_path):
    with _hub(tmp_path, rank=1) as hub:
        hub.update(step=1, losses={"loss": 1.0})
        assert hub.jsonl_path is None
    assert not (tmp_path / "metrics.jsonl").exists()


def test_every_trainer_key_is_declared_once():
    flat = step_metrics(step=1, epoch=0, losses={"loss": 1.0, "ce": 1.0, "con": 0.0, "ali": 0.0},
                        lr={"backbone": 0.1, "head": 0.1}, timings={"data": 0.1, "optimizer": 0.1},
                        images_per_s=1.0, grad_norm=1.0, loss_scale=1.0,
                        head_stats={"phi_mean": 1.0, "margin_max": 0.5, "tau": 0.1, "num_sampled_local": 3,
                                    "con_sampled_local": 2})
    flat.update({"memory/allocated_bytes": 1.0, "memory/cuda_alloc_retries": 0.0, "memory/cuda_ooms": 0.0,
                 "train/skipped_steps": 0, "train/nonfinite_consecutive": 0, "data/skipped_records": 0,
                 "last_update": 0.0})
    for key in flat:
        gauges = [s.prom for s, _ in match(key) if s.kind != "histogram"]
        assert len(gauges) == 1, (key, gauges)
    assert [s.prom for s, _ in match("time/step_s")] == ["pfc_step_seconds"]
    assert match("head/con_sampled_local")[0][0].prom == "pfc_head_stat"
    assert len({s.prom for s in SERIES}) == len(SERIES)  # one declaration per Prometheus name

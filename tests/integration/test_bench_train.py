"""benchmarks/bench_train.py end to end on the CPU: the real trainer, DALI CPU decoding of a
synthetic RecordIO set the script writes itself, the timing and the FLOP arithmetic."""

from __future__ import annotations

import json

import pytest

from benchmarks import bench_train

pytestmark = pytest.mark.slow


def test_bench_train_dali_cpu_reports_consistent_figures(tmp_path):
    out = tmp_path / "r.json"
    rc = bench_train.main([
        "--config", "cpu_demo", "--backbone", "iresnet_nano", "--device", "cpu", "--decode", "cpu",
        "--batch", "8", "--steps", "2", "--warmup", "1", "--synth-identities", "12", "--synth-images", "4",
        "--peak-tflops", "2.0", "--workdir", str(tmp_path / "work"), "--out", str(out),
    ])
    assert rc == 0
    r = json.loads(out.read_text())
    assert (r["device"], r["data_kind"], r["decode"], r["world_size"]) == ("cpu", "dali", "cpu", 1)
    assert r["steps_timed"] == 2 and r["batch_per_device"] == 8
    assert r["images_per_s_per_device"] == pytest.approx(8 / r["step_s_median"])
    fwd = bench_train.backbone_flops("iresnet_nano", 128, 112)
    assert r["backbone_forward_gflops_per_image"] == pytest.approx(fwd / 1e9)
    # cpu_demo: s6, embedding 128, the CE's sample for Con; 12 classes at sample rate 0.5.
    k = r["head_sampled_classes"]
    assert 0 < k <= 12
    head = 2 * 8 * 128 * (3 * k + 2 * k)
    assert r["step_tflops"] == pytest.approx((3 * fwd * 8 + head) / 1e12)
    assert r["achieved_tflops"] == pytest.approx(r["step_tflops"] / r["step_s_median"])
    assert r["fraction_of_peak"] == pytest.approx(r["achieved_tflops"] / 2.0)
    assert (tmp_path / "work" / "synth" / "train.rec").exists()


def test_peak_table_and_override():
    assert bench_train.peak_tflops("NVIDIA H100 80GB HBM3", None) == 989.0
    assert bench_train.peak_tflops("NVIDIA H200", None) == 989.0
    assert bench_train.peak_tflops("cpu", None) is None
    assert bench_train.peak_tflops("cpu", 3.5) == 3.5

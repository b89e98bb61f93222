"""`pfc ablate --spec` with the study-v2 protocol on a tiny test bed: the controls train (the offline
phi refresh included), every study metric is there, study.md has the paired intervals, and a
second invocation reuses every run."""

from __future__ import annotations

import json
import math

import pytest

from train.cli import main

pytestmark = pytest.mark.slow

SPEC = """
[study]
protocol = "study-v2"
identities = 12
size_distribution = "powerlaw"
images_min = 2
images_max = 8
family_size = 3
family_fraction = 1.0
image_size = 56
probe_images_per_identity = 2
cluster_identities = 12
cluster_images_per_identity = 3
ver_identities = 4
ver_images_per_identity = 2
ver_pairs = 20
steps = 4
batch_size = 16
max_impostors = 1000
curve_every_epochs = 1
overrides = ["backbone.name=iresnet_nano"]
variants = ["arcface", "s4:phi_refresh=offline:phi_shuffle=both:phi_count_norm=none"]
seeds = [0, 1]
"""


@pytest.mark.timeout(600)  # 43 s of CPU (150 s wall on the loaded 2-core VM)
def test_study_v2_spec_end_to_end_and_resume(tmp_path, capsys):
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC)
    out = tmp_path / "study"
    assert main(["ablate", "--spec", str(spec), "--out", str(out), "--no-figure"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert len(res["runs"]) == 4 and res["spec"]["protocol"] == "study-v2"
    for r in res["runs"]:
        m = r["metrics"]
        assert r["steps"] == 4 and m["n_genuine"] == 12 * 3 and m["n_impostor"] == 36 * 35 // 2 - 36
        for key in ("tar_1e-3", "fa_lookalike_1e-3", "probe_top1", "probe_top1_tail", "probe_top1_head", "nmi",
                    "phi_logz_rho", "phi_nuisance_rho", "phi_stability"):
            assert key in m, key
        assert math.isnan(m["tar_1e-4"])  # 594 impostors cannot measure 1e-4, and say so
        assert 0.0 <= m["probe_top1"] <= 1.0 and len(r["per_class_probe_top1"]) == 12
        assert len(r["phi"]) == 12 and len(r["margin"]) == 12  # every variant keeps the bank
        assert r["curve"] and r["curve"][-1]["step"] == 4 and "loss" in r["curve"][-1]
        assert r["offline_refreshes"] == (2 if "offline" in r["variant"] else 0)  # before step 1 and after epoch 1
    by = {(r["variant"], r["seed"]): r for r in res["runs"]}
    ctl = "s4:phi_refresh=offline:phi_shuffle=both:phi_count_norm=none"
    # The offline bank holds every class after its first full pass; phi is known for all of them.
    assert all(v is not None for v in by[(ctl, 0)]["phi"])
    cfg = (out / "runs" / "s4__phi_refresh-offline__phi_shuffle-both__phi_count_norm-none__seed0"
           / "config.toml").read_text()
    assert 'phi_shuffle = "both"' in cfg and 'phi_count_norm = "none"' in cfg and "image_size = 56" in cfg
    study = (out / "study.md").read_text()
    assert "95% bootstrap CI" in study and f"| `{ctl}` |" in study and "rho(phi, log Z)" in study
    # The per-identity section: the regression over seeds and what the CG margin follows.
    assert "## Per identity" in study and "per +1 SD log Z" in study
    reg = res["study"]["identity"]["regression"][ctl]
    assert reg["log_size"]["n"] == 2 and len(reg["nuisance"]["per_seed"]) == 2
    paired = res["study"]["paired"][ctl]["probe_top1"]
    assert paired["n"] == 2 and paired["boot_lo"] <= paired["mean"] <= paired["boot_hi"]
    capsys.readouterr()

    assert main(["ablate", "--spec", str(spec), "--out", str(out), "--no-figure"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert all(r["reused"] for r in again["runs"]) and len(again["runs"]) == 4
    assert "(reused)" in capsys.readouterr().out

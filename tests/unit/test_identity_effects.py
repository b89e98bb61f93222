"""train.ablate.identity_effects on runs whose per-identity answer is built in."""

from __future__ import annotations

import numpy as np
import pytest

from train.ablate.identity_effects import Truth, effect_regression, identity_report, margin_correlations


def _truth(c: int = 300, seed: int = 0) -> Truth:
    r = np.random.default_rng(seed)
    size = np.exp(r.uniform(np.log(2), np.log(200), c)).round()
    fam = np.where(np.arange(c) < c // 2, np.arange(c) // 4, -1)
    return Truth({"images": size.tolist(), "difficulty": r.uniform(0, 1, c).tolist(), "family": fam.tolist()})


def _runs(truth: Truth, gain, seeds=range(5), noise: float = 0.01, margin=None):
    runs = []
    r = np.random.default_rng(1)
    for k in seeds:
        base = r.uniform(0.3, 0.9, truth.size.size)
        runs.append({"variant": "arcface", "seed": k, "per_class_probe_top1": base.tolist()})
        v = base + gain + noise * r.normal(size=base.size)
        run = {"variant": "cg", "seed": k, "per_class_probe_top1": v.tolist()}
        if margin is not None:
            run["margin"] = margin.tolist()
        runs.append(run)
    return runs


def test_regression_recovers_each_term() -> None:
    t = _truth()
    x = t.design()
    # +3 points per SD of log size, -1 per SD nuisance, +2 for look-alikes, +0.5 at the mean.
    gain = 0.005 + 0.03 * x[:, 1] - 0.01 * x[:, 2] + 0.02 * x[:, 3]
    reg = effect_regression(_runs(t, gain), t)["cg"]
    for term, want in (("intercept", 0.005), ("log_size", 0.03), ("nuisance", -0.01), ("lookalike", 0.02)):
        assert reg[term]["mean"] == pytest.approx(want, abs=0.004)
        assert reg[term]["t_lo"] < want < reg[term]["t_hi"]
        assert reg[term]["n"] == 5


def test_regression_finds_nothing_in_noise() -> None:
    t = _truth()
    reg = effect_regression(_runs(t, np.zeros(300), noise=0.05), t)["cg"]
    for term in ("log_size", "nuisance", "lookalike"):
        assert reg[term]["t_lo"] < 0 < reg[term]["t_hi"]


def test_margin_follows_what_it_is_built_from() -> None:
    t = _truth()
    by_size = 0.4 + 0.2 * (1 - (np.log(t.size) - np.log(2)) / np.log(100))   # larger margin for small classes
    mc = margin_correlations(_runs(t, np.zeros(300), margin=by_size), t)["cg"]
    assert np.mean(mc["logz"]) < -0.99 and abs(np.mean(mc["nuisance"])) < 0.2
    by_nuis = 0.4 + 0.2 * t.nuisance
    mc = margin_correlations(_runs(t, np.zeros(300), margin=by_nuis), t)["cg"]
    assert np.mean(mc["nuisance"]) > 0.99 and np.mean(mc["nuisance_within_size"]) > 0.99
    # Constant margins (ArcFace) carry no correlation and are left out.
    assert margin_correlations(_runs(t, np.zeros(300), margin=np.full(300, 0.5)), t) == {}


def test_report_section_and_mismatched_lengths_left_out() -> None:
    t = _truth()
    text, numbers = identity_report(_runs(t, np.full(300, 0.02)), t)
    assert "## Per identity" in text and "`cg`" in text
    assert numbers["regression"]["cg"]["intercept"]["mean"] == pytest.approx(0.02, abs=0.003)
    assert set(numbers) == {"regression", "margin_rho"}
    short = _runs(t, np.zeros(300))
    for r in short:
        r["per_class_probe_top1"] = r["per_class_probe_top1"][:10]
    assert effect_regression(short, t) == {}
    with pytest.raises(ValueError, match="differ in length"):
        Truth({"images": [1, 2], "difficulty": [0.1], "family": [-1, -1]})


def test_forest_figure(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    from train.ablate.forest import write_forest_figure

    paired = {"s1": {"tar_1e-4": {"mean": -0.02, "t_lo": -0.03, "t_hi": -0.01}},
              "s2": {"nmi": {"mean": 0.01, "t_lo": -0.01, "t_hi": 0.03}, "probe_top1_tail": {"mean": float("nan")}}}
    path = write_forest_figure(paired, tmp_path / "d.png")
    assert path is not None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert write_forest_figure({}, tmp_path / "e.png") is None and not (tmp_path / "e.png").exists()


def test_contrasts_pair_each_control_with_its_parent() -> None:
    from train.ablate.contrasts import contrast_report, contrasts, parent_of

    assert parent_of("s1:phi_shuffle=margin:x=1") == "s1" and parent_of("s2") == "s2"
    runs = []
    for k in range(5):
        runs += [{"variant": "s1", "seed": k, "metrics": {"tar_1e-3": 0.40 + 0.01 * k}},
                 {"variant": "s1:phi_shuffle=margin", "seed": k, "metrics": {"tar_1e-3": 0.38 + 0.01 * k + 0.001 * (k % 2)}},
                 {"variant": "s9:x=1", "seed": k, "metrics": {"tar_1e-3": 0.5}},  # parent not in the study
                 {"variant": "arcface", "seed": k, "metrics": {"tar_1e-3": 0.3}}]
    c = contrasts(runs, metrics=("tar_1e-3",))
    assert set(c) == {"s1:phi_shuffle=margin"}
    d = c["s1:phi_shuffle=margin"]["tar_1e-3"]
    assert d["mean"] == pytest.approx(-0.0196) and d["n"] == 5 and d["losses"] == 5 and d["t_hi"] < 0
    text, numbers = contrast_report(runs)
    assert "| `s1:phi_shuffle=margin` - `s1` | **-1.96" in text and set(numbers) == {"s1:phi_shuffle=margin"}
    assert contrast_report([r for r in runs if r["variant"] == "arcface"]) == ("", {})

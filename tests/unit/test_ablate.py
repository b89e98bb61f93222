"""`pfc ablate` pieces that need no training: variant parsing, hard-third selection, aggregation."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from train.ablate.data import hard_identities, hard_pair_mask
from train.ablate.protocol_v1 import METRICS
from train.ablate.report import aggregate, format_table
from train.ablate.runner import run_config
from train.ablate.spec import GROUPS, StudySpec, Variant, parse_variants


def test_hard_identities_takes_the_top_third_by_difficulty():
    d = [0.9, 0.1, 0.5, 0.7, 0.2, 0.95]
    assert hard_identities(d).tolist() == [True, False, False, False, False, True]
    # ceil(7 / 3) = 3 identities of 7.
    assert hard_identities([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]).tolist() == [False] * 4 + [True] * 3
    # Ties at the cut are broken by position, so the count is exact.
    assert hard_identities([0.5, 0.5, 0.5]).tolist() == [True, False, False]
    assert hard_identities([0.3, 0.1], fraction=1.0).all()


@pytest.mark.parametrize("bad, match", [([], "non-empty"), ([[0.1]], "1-d")])
def test_hard_identities_rejects_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        hard_identities(bad)
    with pytest.raises(ValueError, match="fraction"):
        hard_identities([0.1], fraction=0.0)


def test_hard_pairs_genuine_by_identity_impostor_by_either_side():
    ids = [10, 11, 12, 13, 14, 15]
    diff = [0.1, 0.9, 0.2, 0.3, 0.8, 0.4]  # hard: 11 and 14
    pairs = np.array([[11, 11], [10, 10], [10, 14], [14, 12], [10, 12], [13, 15], [11, 14]])
    assert hard_pair_mask(pairs, ids, diff).tolist() == [True, False, True, True, False, False, True]


def test_hard_pairs_reject_unknown_identities_and_bad_shapes():
    with pytest.raises(ValueError, match="without a difficulty"):
        hard_pair_mask(np.array([[1, 99]]), [1, 2, 3], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=r"\[P, 2\]"):
        hard_pair_mask(np.array([1, 2, 3]), [1, 2, 3], [0.1, 0.2, 0.3])


def _run(variant, seed, **metrics):
    return {"variant": variant, "seed": seed, "metrics": metrics}


def test_aggregate_mean_and_sample_std_per_variant():
    runs = [_run("arcface", 0, acc=0.80, nmi=0.5), _run("s6", 0, acc=0.90, nmi=0.7),
            _run("arcface", 1, acc=0.84, nmi=0.6), _run("arcface", 2, acc=0.88, nmi=0.7)]
    agg = aggregate(runs, metrics=("acc", "nmi"))
    assert list(agg) == ["arcface", "s6"]  # order of first appearance
    a = agg["arcface"]["acc"]
    assert a["n"] == 3
    assert a["mean"] == pytest.approx(0.84)
    assert a["std"] == pytest.approx(0.04)  # ddof = 1: sqrt((0.04^2 + 0 + 0.04^2) / 2)
    assert agg["arcface"]["nmi"]["std"] == pytest.approx(np.std([0.5, 0.6, 0.7], ddof=1))
    # One seed: a mean, no standard deviation.
    assert agg["s6"]["acc"]["mean"] == pytest.approx(0.9) and math.isnan(agg["s6"]["acc"]["std"])


def test_aggregate_does_not_hide_a_nan_seed():
    agg = aggregate([_run("s1", 0, acc=0.8), _run("s1", 1, acc=float("nan"))], metrics=("acc", "nmi"))
    assert math.isnan(agg["s1"]["acc"]["mean"]) and math.isnan(agg["s1"]["acc"]["std"])
    assert math.isnan(agg["s1"]["nmi"]["mean"])  # missing everywhere


def test_table_marks_best_and_below_baseline():
    keys = [k for k, _ in METRICS]
    base = {k: 0.5 for k in keys}
    runs = [_run("arcface", 0, **base), _run("arcface", 1, **dict(base, acc=0.6)),
            _run("s6", 0, **dict(base, acc=0.7, nmi=0.4)), _run("s6", 1, **dict(base, acc=0.7, nmi=0.4))]
    table = format_table(aggregate(runs))
    lines = table.strip().splitlines()
    assert lines[0].startswith("| variant | seeds | Acc |") and len(lines) == 4
    arc, s6 = lines[2], lines[3]
    assert "| `arcface` | 2 | 55.00 ± 7.07 |" in arc
    assert "**70.00 ± 0.00**" in s6 and "40.00 ± 0.00*" in s6  # best acc; NMI below the baseline


def test_parse_variants_groups_options_and_errors():
    vs = parse_variants(["paper"])
    assert [v.label for v in vs] == list(GROUPS["paper"]) and len(vs) == 11
    v = parse_variants(["s6:margin_direction=looser_smaller:optimizer.lr=0.05", "s6"])
    assert v[0] == Variant("s6:margin_direction=looser_smaller:optimizer.lr=0.05", "s6",
                           ("head.margin_direction=looser_smaller", "optimizer.lr=0.05"))
    assert "/" not in v[0].slug and ":" not in v[0].slug
    assert len(parse_variants(["s6", "s6", "arcface"])) == 2
    with pytest.raises(ValueError, match="unknown method or group 's7'"):
        parse_variants(["s7"])
    with pytest.raises(ValueError, match="key=value"):
        parse_variants(["s6:temperature"])
    with pytest.raises(ValueError, match="before the first"):
        parse_variants(["s6:method=s1"])


def test_run_config_applies_study_user_and_variant_settings_in_order(tmp_path):
    spec = StudySpec(steps=40, overrides=("optimizer.lr=0.05", "head.tau=0.2"))
    v = parse_variants(["s6:tau=0.07"])[0]
    cfg = run_config(spec, v, 3, tmp_path / "runs", tmp_path / "data")
    assert cfg.run.max_steps == 40 and cfg.run.seed == 3 and cfg.optimizer.lr == 0.05
    assert cfg.data.train_rec == str(tmp_path / "data" / "train.rec")
    assert cfg.run_dir == tmp_path / "runs" / f"{v.slug}__seed3"
    head = dataclasses.asdict(cfg.head)
    assert head["method"] == "s6" and head["tau"] == 0.07 and head["seed"] == 3  # the variant wins
    assert head["margin_warmup_steps"] == 8 and head["sample_rate"] == 1.0
    from train.config import ConfigError

    with pytest.raises(ConfigError, match="tempreature|temperature"):
        run_config(spec, parse_variants(["s6:tempreature=fixed"])[0], 0, tmp_path, tmp_path)


def test_study_spec_validates():
    with pytest.raises(ValueError, match="ver_pairs"):
        StudySpec(ver_pairs=31)
    with pytest.raises(ValueError, match="identities"):
        StudySpec(identities=1)


def test_paired_deltas_subtract_the_baseline_of_the_same_seed():
    from train.ablate.report import format_delta_table, paired_deltas

    runs = [_run("arcface", 0, acc=0.70), _run("arcface", 1, acc=0.60), _run("s6", 1, acc=0.65),
            _run("s6", 0, acc=0.69), _run("s6", 2, acc=0.99), _run("arcface", 3, acc=0.5)]
    d = paired_deltas(runs, metrics=("acc",))
    assert list(d) == ["s6"]
    cell = d["s6"]["acc"]
    # Seed 2 has no baseline and is left out; deltas +0.05 (seed 1) and -0.01 (seed 0).
    assert cell["n"] == 2 and cell["wins"] == 1
    assert cell["mean"] == pytest.approx(0.02) and cell["std"] == pytest.approx(np.std([0.05, -0.01], ddof=1))
    row = format_delta_table(d).strip().splitlines()[2]
    assert row.startswith("| `s6` | +2.00 ± 4.24 (1/2) |")


# ------------------------------------------------------------------------------------ study-v2 / spec files
def test_spec_files_load_and_unknown_keys_are_named(tmp_path):
    from pathlib import Path

    from train.ablate.spec import load_spec

    root = Path(__file__).resolve().parents[2] / "train" / "studies"
    spec, run = load_spec(root / "cg_study.toml")
    assert spec.protocol == "study-v2" and spec.image_size == 56 and spec.family_size == 4
    assert run["variants"] == ["cg-study"] and len(run["seeds"]) >= 5 and run["jobs"] == 2
    variants = parse_variants(run["variants"])
    assert len(variants) == len(GROUPS["cg-study"])
    for v in variants:  # every control resolves to a valid config (what `pfc ablate` checks first)
        cfg = run_config(spec, v, 0, tmp_path / "runs", tmp_path / "data")
        assert cfg.data.image_size == 56 and cfg.head.track_clusters is True and cfg.backbone.name == "iresnet_nano"
    by = {v.label: run_config(spec, v, 0, tmp_path / "runs", tmp_path / "data").head for v in variants}
    assert by["s1:phi_shuffle=margin"].phi_shuffle == "margin" and by["s1:phi_refresh=offline"].phi_refresh == "offline"
    assert by["s2:phi_shuffle=temperature"].phi_shuffle == "temperature" and by["s1:phi_count_norm=none"].phi_count_norm == "none"
    sc = spec.synth_config()
    assert sc.size_distribution == "powerlaw" and sc.probe_images_per_identity == 4 and sc.image_size == 56
    # >= 10^6 held-out impostor pairs: n images give n(n-1)/2 pairs, minus the genuine ones.
    n = spec.cluster_identities * spec.cluster_images_per_identity
    per = spec.cluster_images_per_identity
    assert n * (n - 1) // 2 - spec.cluster_identities * per * (per - 1) // 2 >= 10**6
    load_spec(root / "cg_pilot.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text('[study]\nprotocl = "study-v2"\n')
    with pytest.raises(ValueError, match=r"bad.toml: unknown key study.protocl \(did you mean 'protocol'"):
        load_spec(bad)
    bad.write_text('[study]\nprotocol = "study-v2"\nfamily_size = 1\n')
    with pytest.raises(ValueError, match="needs look-alike families"):
        load_spec(bad)


def test_study_sets_keep_the_first_study_unchanged():
    old = StudySpec()
    assert not any("image_size" in s or "track_clusters" in s for s in old.study_sets())
    new = StudySpec(protocol="study-v2", family_size=4, probe_images_per_identity=2, image_size=56)
    assert "data.image_size=56" in new.study_sets() and "head.track_clusters=true" in new.study_sets()
    assert "family_size" not in old.synth_config().record()


def test_fingerprint_ignores_later_options_at_their_default(tmp_path):
    from train.ablate.runner import fingerprint
    from train.config import config_to_dict

    spec = StudySpec()
    v = parse_variants(["s6"])[0]
    d = config_to_dict(run_config(spec, v, 0, tmp_path / "runs", tmp_path / "data"))
    stripped = json.loads(json.dumps(d, default=str))
    for section, key in (("data", "image_size"), ("head", "phi_count_norm"), ("head", "phi_shuffle"),
                         ("head", "phi_refresh")):
        stripped[section].pop(key)
    assert fingerprint(d, spec) == fingerprint(stripped, spec)  # runs of the first study stay reusable
    shuffled = parse_variants(["s6:phi_shuffle=margin"])[0]
    d2 = config_to_dict(run_config(spec, shuffled, 0, tmp_path / "runs", tmp_path / "data"))
    assert fingerprint(d2, spec) != fingerprint(d, spec)


# Fingerprints of runs made before train/ablate.py became the train/ablate/ package (computed with
# that code). A finished run is reused only while its fingerprint matches: if one of these changes,
# every finished study is silently re-trained. Change them only together with a migration.
_KNOWN_FINGERPRINTS = (
    ("default", "arcface", 0, "4ac1bffa7baf61cc"),
    ("default", "s6", 2, "8b58b9da6f8c65c0"),
    ("cg_study", "s1:phi_refresh=offline", 1, "54b6cbe0a255d174"),
    ("cg_study", "arcface", 1, "d6b33b142a9dca77"),
)


@pytest.mark.parametrize("study,label,seed,expected", _KNOWN_FINGERPRINTS)
def test_fingerprint_of_finished_runs_is_unchanged(tmp_path, study, label, seed, expected):
    from train.ablate.runner import fingerprint
    from train.ablate.spec import load_spec
    from train.config import config_to_dict

    root = Path(__file__).resolve().parents[2] / "train" / "studies"
    spec = StudySpec() if study == "default" else load_spec(root / f"{study}.toml")[0]
    v = parse_variants([label])[0]
    cfg = run_config(spec, v, seed, tmp_path / "runs", tmp_path / "data")
    assert fingerprint(config_to_dict(cfg), spec) == expected


def test_package_import_is_light_and_cli_follows_the_convention():
    import argparse
    import subprocess
    import sys

    code = ("import sys, train.ablate as a; "
            "assert not [m for m in sys.modules if m.split('.')[0] in ('matplotlib', 'torch', 'sklearn')], "
            "sorted(m for m in sys.modules if m.split('.')[0] in ('matplotlib', 'torch', 'sklearn'))[:5]; "
            "assert callable(a.main); print('ok')")
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr
    from train.ablate import cli

    p = argparse.ArgumentParser(prog="pfc ablate")
    cli.add_arguments(p)
    args = p.parse_args(["--out", str(root / "unused"), "--variants", "s9"])
    assert cli.run(args) == 2  # an unknown variant is refused before anything is made

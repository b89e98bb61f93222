"""The `pfc` argparse tree (train/cli/): every verb's --help exits 0 and has the shared layout,
`pfc --help` lists every verb, `pfc synth`'s two forms and the usage error for mixed options."""

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from train.cli import build_parser, main, verbs

ROOT = Path(__file__).resolve().parents[2]
VERBS = list(verbs())


def _flat(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def test_every_verb_is_listed_with_its_help_line(capsys):
    assert VERBS == ["train", "synth", "pack", "eval", "export", "plan", "ablate", "config", "demo"]
    assert main(["--help"]) == 0
    out = _flat(capsys.readouterr().out)
    assert out.startswith("usage: pfc ")
    for name, v in verbs().items():
        assert f"{name} {v.help}" in out, name
    assert main([]) == 0 and _flat(capsys.readouterr().out) == out
    assert main(["nope"]) == 2 and "unknown verb 'nope'" in capsys.readouterr().err


def test_listing_the_verbs_imports_nothing_heavy():
    code = ("import sys; from train.cli import main; main(['--help']); "
            "heavy = [m for m in ('torch', 'numpy', 'nvidia.dali', 'train.config') if m in sys.modules]; "
            "assert not heavy, heavy; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.stdout.strip().endswith("ok"), out.stderr


@pytest.mark.parametrize("name", VERBS)
def test_verb_help_exits_0_with_the_shared_layout(name, capsys):
    v = verbs()[name]
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: pfc {name} "), out[:80]
    assert _flat(v.description) in _flat(out)
    assert "\nexamples:\n" in out
    assert any(line.startswith(f"  pfc {name}") for line in out.split("\nexamples:\n", 1)[1].splitlines())
    assert len(v.help) <= 110 and "\n" not in v.help


def test_every_option_sits_in_a_titled_group():
    """Only -h/--help in argparse's untitled groups; the verb's own options in named groups."""
    parser = build_parser()
    for name, p in parser.verb_parsers.items():
        titled = {id(a) for g in p._action_groups if g is not p._optionals and g is not p._positionals
                  for a in g._group_actions}
        titles = [g.title for g in p._action_groups]
        assert len(titles) == len(set(titles)), (name, titles)  # no second "options" heading
        loose = [a.option_strings or a.dest for a in p._actions if id(a) not in titled and a.dest != "help"]
        assert not loose, (name, loose)
        assert p.prog == f"pfc {name}"


def test_synth_explicit_form_writes_the_sizes_given(tmp_path, capsys):
    out = tmp_path / "syn"
    rc = main(["synth", "--out", str(out), "--identities", "3", "--images", "2", "--ver-identities", "3",
               "--ver-images", "2", "--ver-pairs", "4", "--cluster-identities", "2", "--cluster-images", "2",
               "--size", "32", "--workers", "1", "--no-progress"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["train_images"] == 6 and summary["verification_pairs"] == 4
    assert (out / "train.rec").is_file() and (out / "verification.bin").is_file()


def test_synth_recipe_form_uses_data_synth_and_reuses_an_identical_dataset(tmp_path, capsys, monkeypatch):
    """The recipe form hands [data.synth] to the generator (stubbed: the real one is tested in
    tests/data), skips an identical dataset and regenerates with --force."""
    import dali_pipelines.synth_faces as synth

    calls = []

    def fake_generate(out_dir, config, *, workers=None, progress=True):
        calls.append((config, workers, progress))
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "identities.json").write_text(json.dumps({"config": config.record()}))
        (Path(out_dir) / "train.idx").write_text("")
        return {"out_dir": str(out_dir), "train_identities": config.train_identities, "train_images": 0,
                "verification_pairs": config.ver_pairs, "cluster_images": 0, "seconds": 0.0}

    monkeypatch.setattr(synth, "generate_synthetic_dataset", fake_generate)
    argv = ["synth", "--config", "cpu_demo", "--set", f"data.synth.out_dir={tmp_path / 'd'}",
            "--set", "data.synth.identities=7", "--no-progress", "--workers", "1"]
    assert main(argv) == 0 and "7 identities" in capsys.readouterr().out
    (cfg, workers, progress), = calls
    assert cfg.train_identities == 7 and workers == 1 and progress is False
    assert main(argv) == 0 and "up to date" in capsys.readouterr().out and len(calls) == 1
    assert main([*argv, "--force"]) == 0 and len(calls) == 2


def test_synth_recipe_form_carries_the_study_options(tmp_path, monkeypatch):
    """Every study option of the generator is a [data.synth] key, handed over unchanged; bad
    values are config errors naming the key."""
    import dali_pipelines.synth_faces as synth
    from train.cli.data import synth_config
    from train.config import ConfigError, SynthDataConfig, load_config

    # The same keys with the same defaults in the generator, the recipe section and a study spec.
    from train.ablate.spec import StudySpec

    for cls in (SynthDataConfig, StudySpec):
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        assert {k: defaults.get(k) for k in synth.STUDY_OPTIONS} == synth._STUDY_DEFAULTS, cls
    sets = ["data.synth.family_size=4", "data.synth.family_share=0.85", "data.synth.size_distribution=powerlaw",
            "data.synth.images_min=3", "data.synth.images_max=50", "data.synth.size_exponent=1.5",
            "data.synth.probe_images_per_identity=2", "data.synth.family_fraction=0.25"]
    sc = synth_config(load_config("cpu_demo", sets))
    assert (sc.family_size, sc.family_share, sc.size_distribution, sc.images_min, sc.images_max) == (
        4, 0.85, "powerlaw", 3, 50)
    assert (sc.size_exponent, sc.probe_images_per_identity, sc.family_fraction) == (1.5, 2, 0.25)
    # The defaults give the record of a dataset made before these options existed.
    assert not set(synth.STUDY_OPTIONS) & set(synth_config(load_config("cpu_demo")).record())
    for bad, key in (("data.synth.size_distribution=zipf", "size_distribution"),
                     ("data.synth.images_max=1", "images_max"), ("data.synth.family_share=1.5", "family_share")):
        with pytest.raises(ConfigError, match=f"data.synth.{key}"):
            load_config("cpu_demo", [bad])


@pytest.mark.parametrize("argv, message", [
    (["--out", "d", "--config", "cpu_demo"], "does not go with recipe-form options (--config)"),
    (["--out", "d", "--set", "data.synth.identities=3", "--force"], "recipe-form options (--set, --force)"),
    (["--identities", "3", "--size", "32"], "explicit-form options (--identities, --size) need --out DIR"),
    (["--config", "cpu_demo", "--seed", "1"], "explicit-form options (--seed) need --out DIR"),
])
def test_synth_mixed_forms_are_a_usage_error(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["synth", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "usage: pfc synth" in err and "pfc synth: error: " in err and message in _flat(err), err


def test_train_refuses_the_offline_phi_control_before_any_work(tmp_path, capsys):
    rc = main(["train", "--config", "cpu_demo", "--set", "head.phi_refresh=offline",
               "--set", f"run.output_dir={tmp_path}"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "head.phi_refresh = 'offline'" in err and "pfc ablate" in err
    assert not any(tmp_path.iterdir())  # nothing made: no run directory, no data

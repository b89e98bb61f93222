"""`pfc eval` end to end: a tiny checkpoint from the in-process trainer, a tiny synthetic dataset,
the report from the checkpoint, its exported state dict and its ONNX export (metric parity)."""

from __future__ import annotations

import json
import pickle

import pytest

from train.evaluate.cli import main as eval_main

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

TOP_KEYS = {"model", "flip", "verification", "templates", "ijb", "ijbb_clustering", "megaface", "clustering", "concentration", "concentration_note",
            "figures", "seconds"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 6-step s6 checkpoint (CG margin active from step 0), its exports, and a synthetic dataset."""
    from dali_pipelines.synth_faces import SynthConfig, generate_synthetic_dataset
    from train.cli import main as pfc
    from train.config import load_config
    from train.trainer import Trainer

    root = tmp_path_factory.mktemp("eval")
    sets = {
        "run.output_dir": f'"{root}"', "run.name": '"tiny"', "run.max_steps": 6, "run.log_every": 100,
        "data.kind": '"synthetic"', "data.train_rec": '""', "data.batch_size": 8,
        "data.synth.identities": 20, "data.synth.images_per_identity": 8, "head.margin_warmup_steps": 0,
        "evaluation.bin_files": "[]", "evaluation.every_steps": 0, "checkpoint.every_steps": 0,
        "metrics.prometheus": "false", "metrics.progress_bar": "false", "export.onnx": "false",
    }
    t = Trainer(load_config("cpu_demo", [f"{k}={v}" for k, v in sets.items()]), handle_signals=False)
    try:
        t.fit()
    finally:
        t.close()
    synth = root / "synth"
    generate_synthetic_dataset(synth, SynthConfig(
        train_identities=2, images_per_identity=2, ver_identities=10, ver_images_per_identity=4, ver_pairs=100,
        cluster_identities=8, cluster_images_per_identity=6), workers=1, progress=False)
    assert pfc(["export", "--checkpoint", str(root / "tiny"), "--out", str(root / "export"), "--onnx"]) == 0
    return root


def _run(tiny, name, *model, extra=()):
    out = tiny / name
    rc = eval_main([*model, "--synthetic", str(tiny / "synth"), "--out", str(out), "--cluster-sizes", "4,8",
                    "--templates-per-identity", "3", *extra])
    assert rc == 0
    return out, json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def from_checkpoint(tiny):
    return _run(tiny, "eval_ckpt", "--checkpoint", str(tiny / "tiny"))


def test_report_from_checkpoint(from_checkpoint):
    out, m = from_checkpoint
    assert set(m) == TOP_KEYS
    assert m["model"]["kind"] == "checkpoint" and m["model"]["step"] == 6 and m["model"]["backbone"] == "iresnet_nano"
    (v,) = m["verification"]
    assert v["num_pairs"] == 100 and 0.0 <= v["accuracy"] <= 1.0
    assert list(v["tar_at_far"]) == ["1e-01"] and v["omitted_fars"] == ["1e-06", "1e-05", "1e-04", "1e-03", "1e-02"]
    assert v["gap"] == pytest.approx(v["pos_mean"] - v["neg_mean"])
    assert [b["range"].split()[0] for b in v["by_difficulty"]] == ["easy", "medium", "hard"]
    assert sum(b["num_pairs"] for b in v["by_difficulty"]) == 100
    t = m["templates"]
    assert t["num_templates"] == 24 and t["num_pos"] == 24 and t["num_neg"] == 24 * 23 // 2 - 24
    assert t["omitted_fars"] == ["1e-05", "1e-04", "1e-03"] and t["tar_at_far"] == {}
    c = m["clustering"]
    assert c["num_images"] == 48 and c["num_identities"] == 8
    assert [(r["num_identities"], r["algorithm"]) for r in c["runs"]] == [
        (k, a) for k in (4, 8) for a in ("kmeans", "dbscan", "agglomerative")]
    for r in c["runs"]:
        assert {"nmi", "pairwise_f", "bcubed_f", "num_clusters", "params"} <= set(r)
        assert 0.0 <= r["nmi"] <= 1.0 and 0.0 <= r["bcubed_f"] <= 1.0
    assert len(c["by_difficulty"]) == 9
    conc = m["concentration"]
    assert conc["method"] == "s6" and conc["margin"] == "cg_arcface" and conc["num_classes"] == 20
    assert conc["num_known_phi"] > 0 and not conc["warmup_active"]
    assert 0.4 - 1e-6 <= conc["margin_m2"]["min"] <= conc["margin_m2"]["max"] <= 0.6 + 1e-6
    assert set(m["figures"].values()) == {"hist_verification.png", "hist_templates.png", "roc.png",
                                         "concentration.png"}
    for name in m["figures"].values():
        png = (out / name).read_bytes()
        assert len(png) > 5000 and png[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    for name in m["figures"].values():
        assert f"]({name})" in report
    assert "## Clustering" in report and "## 1:1 template verification" in report and "omitted" in report
    assert (out / "protocol" / "templates.txt").is_file()


def test_onnx_and_state_dict_give_the_same_metrics(tiny, from_checkpoint):
    _, ref = from_checkpoint
    _, onnx = _run(tiny, "eval_onnx", "--onnx", str(tiny / "export" / "model.onnx"))
    _, sd = _run(tiny, "eval_sd", "--weights", str(tiny / "export" / "backbone.pt"))
    assert onnx["model"]["kind"] == "onnx" and sd["model"]["kind"] == "weights"
    assert onnx["concentration"] is None and "--checkpoint" in onnx["concentration_note"]
    # The exported state dict is the same network in the same runtime: identical figures.
    drop = lambda d: {k: v for k, v in d.items() if k not in ("templates", "pairs", "seconds")}  # noqa: E731
    assert sd["verification"] == ref["verification"]
    assert drop(sd["templates"]) == drop(ref["templates"])
    strip = lambda runs: [{k: v for k, v in r.items() if k != "seconds"} for r in runs]  # noqa: E731
    assert strip(sd["clustering"]["runs"]) == strip(ref["clustering"]["runs"])
    # onnxruntime differs from PyTorch by ~1e-6 per feature: scores agree closely, decisions too.
    v, w = onnx["verification"][0], ref["verification"][0]
    for k in ("pos_mean", "neg_mean", "gap", "threshold"):
        assert v[k] == pytest.approx(w[k], abs=1e-4), k
    assert v["accuracy"] == pytest.approx(w["accuracy"], abs=0.011)
    assert v["tar_at_far"]["1e-01"] == pytest.approx(w["tar_at_far"]["1e-01"], abs=0.021)
    assert onnx["templates"]["gap"] == pytest.approx(ref["templates"]["gap"], abs=1e-4)
    for a, b in zip(onnx["clustering"]["runs"], ref["clustering"]["runs"]):
        assert a["algorithm"] == b["algorithm"] and a["nmi"] == pytest.approx(b["nmi"], abs=0.05)


def test_flip_changes_the_embeddings(tiny, from_checkpoint):
    _, ref = from_checkpoint
    assert ref["flip"] is True  # the default, as in training-time evaluation and published tables
    out = tiny / "eval_flip"
    assert eval_main(["--checkpoint", str(tiny / "tiny"), "--bin", str(tiny / "synth" / "verification.bin"),
                      "--no-flip", "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["flip"] is False and m["templates"] is None and m["clustering"] is None
    assert m["verification"][0]["pos_mean"] != pytest.approx(ref["verification"][0]["pos_mean"], abs=1e-6)
    assert (out / "hist_verification.png").stat().st_size > 0 and (out / "concentration.png").is_file()


def test_clear_errors(tiny, tmp_path, capsys):
    ck = ["--checkpoint", str(tiny / "tiny")]
    cases = [
        ([*ck, "--out", str(tmp_path / "o")], "nothing to evaluate"),
        ([*ck, "--bin", str(tmp_path / "nope.bin"), "--out", str(tmp_path / "o")], "nope.bin does not exist"),
        ([*ck, "--templates", str(tiny / "eval_ckpt" / "protocol" / "templates.txt"), "--out", str(tmp_path / "o")],
         "together"),
        ([*ck, "--synthetic", str(tmp_path), "--out", str(tmp_path / "o")], "pfc synth"),
        (["--checkpoint", str(tmp_path), "--clustering-rec", str(tiny / "synth" / "cluster.rec"),
          "--out", str(tmp_path / "o")], "no complete checkpoint"),
        ([*ck, "--clustering-rec", str(tiny / "synth" / "cluster.rec"), "--cluster-sizes", "4,99",
          "--out", str(tmp_path / "o")], "exceed the 8 identities"),
    ]
    for argv, match in cases:
        assert eval_main(argv) == 2, argv
        assert match in capsys.readouterr().err, (argv, match)

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    evil = tmp_path / "evil.bin"
    evil.write_bytes(pickle.dumps(([Evil()], [True]), protocol=2))
    assert eval_main([*ck, "--bin", str(evil), "--out", str(tmp_path / "o")]) == 2
    assert "evil.bin" in capsys.readouterr().err and not (tmp_path / "pwned").exists()
    with pytest.raises(SystemExit):  # argparse: exactly one model source
        eval_main(["--checkpoint", "a", "--onnx", "b", "--out", "o"])

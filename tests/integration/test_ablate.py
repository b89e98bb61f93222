"""`pfc ablate --quick`: two variants x one seed end to end, then a second invocation that reuses them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from train.ablate.protocol_v1 import METRICS
from train.cli import main

pytestmark = pytest.mark.slow


@pytest.mark.timeout(600)  # ~20 s on an idle 2-core VM; the margin is for a loaded one
def test_quick_study_writes_results_and_reuses_finished_runs(tmp_path, capsys):
    out = tmp_path / "study"
    args = ["ablate", "--quick", "--out", str(out), "--variants", "arcface", "s6:temperature=fixed",
            "--seeds", "0", "--no-figure"]
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["variants"] == ["arcface", "s6:temperature=fixed"] and res["seeds"] == [0]
    assert res["machine"]["cpu_count"] >= 1 and res["command"].startswith("pfc ablate")
    assert len(res["runs"]) == 2
    for r in res["runs"]:
        assert r["reused"] is False and r["steps"] == 3 and r["wall_s"] > 0
        m = r["metrics"]
        for key, _ in METRICS:
            assert key in m
        # Quick data: 60 pairs, 30 impostors: TAR at 1e-3 is not measurable and must say so.
        assert m["pairs"] == 60 and math.isnan(m["tar_1e-3"])
        assert 0.0 <= m["acc"] <= 1.0 and 0.0 <= m["nmi"] <= 1.0 and 0.0 < m["bcubed_f"] <= 1.0
        assert 0 < m["hard_pairs"] < 60 and m["clusters"] == 6
    fixed = res["runs"][1]
    assert fixed["overrides"] == ["head.temperature=fixed"]
    cfg_text = (tmp_path / "study" / "runs" / "s6__temperature-fixed__seed0" / "config.toml").read_text()
    assert 'temperature = "fixed"' in cfg_text and 'method = "s6"' in cfg_text
    agg = res["aggregate"]
    assert set(agg) == {"arcface", "s6:temperature=fixed"} and agg["arcface"]["acc"]["n"] == 1
    table = (out / "table.md").read_text().splitlines()
    assert table[0].startswith("| variant | seeds | Acc | TAR@1e-3 |") and table[4] == ""
    assert "| `s6:temperature=fixed` | 1 |" in table[3] and "n/a" in table[3]
    assert table[5].startswith("Paired differences to `arcface`")
    assert table[-1].startswith("| `s6:temperature=fixed` | ") and "(" in table[-1]
    assert set(res["paired_deltas"]) == {"s6:temperature=fixed"}

    # The de-duplicated pair scoring equals the plain evaluation of every pair of the .bin, and the
    # hard subset is what identities.json says: rebuild the arcface model from its checkpoint.
    import numpy as np
    import torch

    from partial_fc.backbones import build_backbone
    from train.ablate.data import hard_pair_mask
    from train.checkpoint import export_backbone_state
    from train.evaluate.runner import embed_images, load_pair_set
    from train.evaluate.verification import ten_fold_accuracy

    arc = res["runs"][0]
    model = build_backbone("iresnet_nano", num_features=128)
    model.load_state_dict(export_backbone_state(Path(arc["run_dir"]) / "checkpoints"))
    model.eval()
    pairs = load_pair_set(out / "data" / "verification.bin")
    emb = embed_images(model, pairs.images, torch.device("cpu")).numpy().astype(np.float64)
    scores = (emb[0::2] * emb[1::2]).sum(1)
    assert ten_fold_accuracy(scores, pairs.issame)[0] == pytest.approx(arc["metrics"]["acc"], abs=1e-12)
    meta = json.loads((out / "data" / "identities.json").read_text())["verification"]
    hard = hard_pair_mask(np.array(meta["pairs"]), meta["identities"], meta["difficulty"])
    assert int(hard.sum()) == arc["metrics"]["hard_pairs"]
    assert ten_fold_accuracy(scores[hard], pairs.issame[hard])[0] == pytest.approx(arc["metrics"]["hard_acc"],
                                                                                    abs=1e-12)

    # Second invocation: both runs are reused (nothing trained), plus one new seed that is trained.
    stamp = {d: d.stat().st_mtime_ns for d in (Path(r["run_dir"]) / "result.json" for r in res["runs"])}
    capsys.readouterr()
    assert main(["ablate", "--quick", "--out", str(out), "--variants", "arcface", "s6:temperature=fixed",
                 "--seeds", "0", "--no-figure"]) == 0
    res2 = json.loads((out / "results.json").read_text())
    assert [r["reused"] for r in res2["runs"]] == [True, True]
    assert [r["metrics"] for r in res2["runs"]] == [r["metrics"] for r in res["runs"]]
    assert "(reused)" in capsys.readouterr().out
    assert {d: d.stat().st_mtime_ns for d in stamp} == stamp

    # --report-only trains nothing: finished runs are collected, the others listed as missing.
    assert main(["ablate", "--quick", "--out", str(out), "--variants", "arcface", "s2", "--seeds", "0",
                 "--no-figure", "--report-only"]) == 0
    res_r = json.loads((out / "results.json").read_text())
    assert [r["variant"] for r in res_r["runs"]] == ["arcface"] and res_r["runs"][0]["reused"] is True
    assert res_r["missing"] == [{"variant": "s2", "seed": 0}]
    assert not (out / "runs" / "s2__seed0").exists()

    # A changed setting invalidates the fingerprint: the run is trained again.
    assert main(["ablate", "--quick", "--out", str(out), "--variants", "arcface", "--seeds", "0",
                 "--no-figure", "--set", "optimizer.lr=0.05"]) == 0
    res3 = json.loads((out / "results.json").read_text())
    assert [r["reused"] for r in res3["runs"]] == [False]


def test_bad_arguments_fail_before_any_work(tmp_path, capsys):
    out = tmp_path / "nothing"
    assert main(["ablate", "--quick", "--out", str(out), "--variants", "s9"]) == 2
    assert "unknown method or group 's9'" in capsys.readouterr().err
    assert main(["ablate", "--quick", "--out", str(out), "--set", "head.tempreture=fixed"]) == 2
    assert "temperature" in capsys.readouterr().err
    assert main(["ablate", "--quick", "--out", str(out), "--seeds", "1", "1"]) == 2
    assert not out.exists()

"""model.init_from (fine-tuning from pretrained backbone weights) and checkpoint.keep_best."""

from __future__ import annotations

import json
import re

import pytest
import torch

from partial_fc.head import init_class_centers
from train.checkpoint import CheckpointError, export_backbone_state, find_latest
from train.config import ConfigError, load_config
from train.trainer import Trainer

pytestmark = pytest.mark.slow


def _cfg(data_dir, tmp_path, name, **sets):
    base = {
        "run.output_dir": f'"{tmp_path}"', "run.name": f'"{name}"', "run.max_steps": 2, "run.log_every": 1,
        "data.kind": '"torch"', "data.num_workers": 0, "data.train_rec": f'"{data_dir / "train.rec"}"',
        "data.batch_size": 16, "evaluation.bin_files": "[]", "evaluation.every_steps": 0,
        "checkpoint.every_steps": 0, "metrics.prometheus": "false", "metrics.progress_bar": "false",
        "export.onnx": "false", "backbone.num_features": 64, "head.embedding_size": 64,
    }
    base.update({k: str(v) for k, v in sets.items()})
    return load_config("cpu_demo", [f"{k}={v}" for k, v in base.items()])


def _run(cfg, export=False):
    t = Trainer(cfg, handle_signals=False)
    try:
        summary = t.fit()
        if export:
            summary["export"] = t.export()
        return t, summary
    finally:
        t.close()


def test_init_from_loads_backbone_weights_only(data_dir, tmp_path):
    pre, _ = _run(_cfg(data_dir, tmp_path, "pre", **{"run.max_steps": 3}), export=True)
    pretrained = export_backbone_state(find_latest(pre.ckpt_root))
    for source in (pre.run_dir, pre.run_dir / "export" / "backbone.pt", find_latest(pre.ckpt_root)):
        t = Trainer(_cfg(data_dir, tmp_path, "ft", **{"model.init_from": f'"{source}"', "checkpoint.resume": '"none"'}),
                    handle_signals=False)
        try:
            assert t.resumed_from is None and t.initialized_from is not None and t.state.step == 0
            for k, v in t.engine.module.state_dict().items():
                assert torch.equal(v, pretrained[k]), (source, k)
            h = t.head
            fresh = init_class_centers(h.class_start, h.num_local_classes, 64, h.config.init_std, h.config.seed)
            assert torch.equal(h.weight.detach(), fresh)  # a new head
            assert not t.head_opt.state and not t.engine.optimizer.state  # new optimizers
        finally:
            t.close()

    # A fine-tuning run that was stopped resumes from its own checkpoint, not from init_from.
    cfg = _cfg(data_dir, tmp_path, "ft2", **{"model.init_from": f'"{pre.run_dir}"', "run.max_steps": 2})
    t, summary = _run(cfg)
    assert summary["initialized_from"] == str(pre.run_dir)
    again = Trainer(_cfg(data_dir, tmp_path, "ft2", **{"model.init_from": f'"{pre.run_dir}"', "run.max_steps": 3}),
                    handle_signals=False)
    try:
        assert again.resumed_from is not None and again.initialized_from is None and again.state.step == 2
    finally:
        again.close()


def test_init_from_errors(data_dir, tmp_path):
    with pytest.raises(ConfigError, match="init_from .* and checkpoint.resume .* both"):
        _cfg(data_dir, tmp_path, "x", **{"model.init_from": '"/a"', "checkpoint.resume": '"/b/step_000000001"'})
    with pytest.raises(CheckpointError, match="does not exist"):
        Trainer(_cfg(data_dir, tmp_path, "x", **{"model.init_from": f'"{tmp_path / "nothing"}"'}), handle_signals=False)
    pre, _ = _run(_cfg(data_dir, tmp_path, "pre", **{"run.max_steps": 1}))
    wrong = {"model.init_from": f'"{pre.run_dir}"', "backbone.num_features": 32, "head.embedding_size": 32}
    with pytest.raises(CheckpointError, match="embedding size 64"):
        Trainer(_cfg(data_dir, tmp_path, "y", **wrong), handle_signals=False)


def test_keep_best_keeps_the_best_evaluated_checkpoint(data_dir, tmp_path):
    sets = {"run.max_steps": 6, "evaluation.bin_files": f'["{data_dir / "verification.bin"}"]',
            "evaluation.every_steps": 2, "evaluation.folds": 2, "checkpoint.keep_last": 1,
            "checkpoint.keep_best": '"verification/accuracy"', "evaluation.far_targets": "[0.1]"}
    t, summary = _run(_cfg(data_dir, tmp_path, "best", **sets))
    root = t.ckpt_root
    evals = [(int(m.group(1)), float(m.group(2))) for m in re.finditer(
        r"eval step (\d+) verification\S* acc(?:uracy)?[ =]+([0-9.]+)", (t.run_dir / "train_rank0.log").read_text())]
    record = json.loads((root / "best" / "best.json").read_text())
    assert summary["best"]["step"] == record["step"] and summary["best"]["value"] == record["value"]
    assert [s for s, _ in evals] == [2, 4, 6]  # the log's figures (rounded) agree with the record
    assert max(v for _, v in evals) == pytest.approx(record["value"], abs=1e-3)
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("step_")) == ["step_000000006"]
    assert json.loads((root / "best" / "manifest.json").read_text())["step"] == record["step"]
    assert find_latest(root).name == "step_000000006"
    with pytest.raises(ValueError, match="not an evaluation figure; there are: verification/accuracy"):
        _run(_cfg(data_dir, tmp_path, "bad", **{**sets, "checkpoint.keep_best": '"verification/bogus"'}))

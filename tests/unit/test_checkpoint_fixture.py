"""Checkpoints written by earlier code keep loading.

``tests/fixtures/checkpoint_v1`` is a run directory written by the trainer as of commit 0e12d7b
(checkpoint ``format_version`` 1: one rank, ``iresnet_nano`` with 16-d embeddings, an ``s6``
head over 12 classes, SGD with momentum, 2 steps on the in-memory synthetic data). It was made
with this command, from the repository root::

    python - <<'EOF'
    from train.config import load_config; from train.trainer import Trainer
    sets = {"run.output_dir": '"/tmp/fix"', "run.name": '"fixture"', "run.max_steps": 2,
            "run.log_every": 1, "data.kind": '"synthetic"', "data.train_rec": '""',
            "data.batch_size": 8, "data.synth.identities": 12, "data.synth.images_per_identity": 4,
            "evaluation.bin_files": "[]", "evaluation.every_steps": 0, "checkpoint.every_steps": 2,
            "metrics.prometheus": "false", "metrics.progress_bar": "false",
            "export.onnx": "false", "backbone.num_features": 16, "head.embedding_size": 16}
    t = Trainer(load_config("cpu_demo", [f"{k}={v}" for k, v in sets.items()]), handle_signals=False)
    t.fit(); t.close()
    EOF

Refactors and format changes must keep these tests green: a user's checkpoints outlive the code
that wrote them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from partial_fc.backbones import build_backbone
from train.checkpoint import export_backbone_state, find_latest
from train.config import load_config
from train.trainer import Trainer

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoint_v1"
STEP = FIXTURE / "checkpoints" / "step_000000002"


def _copy(tmp_path: Path) -> Path:
    run_dir = tmp_path / "fixture"
    shutil.copytree(FIXTURE, run_dir)
    return run_dir


def test_fixture_is_format_version_1():
    manifest = json.loads((STEP / "manifest.json").read_text())
    assert manifest["format_version"] == 1 and manifest["step"] == 2 and manifest["world_size"] == 1


def test_v1_checkpoint_is_found_and_exports_a_loadable_backbone(tmp_path):
    run_dir = _copy(tmp_path)
    latest = find_latest(run_dir / "checkpoints")
    assert latest is not None and latest.name == STEP.name
    state = export_backbone_state(latest)
    cfg = load_config(FIXTURE / "config.toml")
    backbone = build_backbone(cfg.backbone.name, num_features=cfg.backbone.num_features)
    backbone.load_state_dict(state)  # strict: every key and shape matches
    assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


def test_v1_checkpoint_resumes_training(tmp_path):
    run_dir = _copy(tmp_path)
    cfg = load_config(FIXTURE / "config.toml",
                      [f'run.output_dir="{tmp_path}"', "run.max_steps=3", 'checkpoint.resume="auto"'])
    trainer = Trainer(cfg, handle_signals=False)
    try:
        assert trainer.state.step == 2
        summary = trainer.fit()
    finally:
        trainer.close()
    assert summary["step"] == 3
    assert Path(summary["resumed_from"]).name == STEP.name
    assert Path(summary["run_dir"]) == run_dir

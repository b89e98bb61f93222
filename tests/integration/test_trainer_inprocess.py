"""The trainer in this process (world of one): non-finite steps, bad evaluation files, export CLI."""

from __future__ import annotations

import math
import pickle

import pytest
import torch

from train.config import load_config
from train.trainer import NonFiniteLossError, Trainer

pytestmark = pytest.mark.slow


def _cfg(tmp_path, **sets):
    base = {
        "run.output_dir": f'"{tmp_path}"', "run.name": '"inproc"', "run.max_steps": 6, "run.log_every": 1,
        "data.kind": '"synthetic"', "data.train_rec": '""', "data.batch_size": 8,
        "data.synth.identities": 20, "data.synth.images_per_identity": 8,
        "evaluation.bin_files": "[]", "evaluation.every_steps": 0, "checkpoint.every_steps": 0,
        "metrics.prometheus": "false", "metrics.progress_bar": "false", "export.onnx": "false",
    }
    base.update({k: str(v) for k, v in sets.items()})
    return load_config("cpu_demo", [f"{k}={v}" for k, v in base.items()])


def _poison(trainer: Trainer, bad_calls: set[int]) -> list[int]:
    """Makes the head's loss NaN on the given (1-based) forward calls."""
    calls = []
    forward = trainer.head.forward

    def poisoned(emb, labels):
        out = forward(emb, labels)
        calls.append(len(calls) + 1)
        if calls[-1] in bad_calls:
            out = dict(out, loss=out["loss"] * float("nan"))
        return out

    trainer.head.forward = poisoned
    return calls


def test_nonfinite_steps_are_skipped_and_counted(tmp_path):
    t = Trainer(_cfg(tmp_path), handle_signals=False)
    try:
        _poison(t, {2, 3})
        params = {n: p.detach().clone() for n, p in t.engine.module.named_parameters()}
        w_before = t.head.weight.detach().clone()
        summary = t.fit()
        assert summary["step"] == 6 and summary["skipped_steps"] == 2
        assert t.state.consecutive_nonfinite == 0
        assert all(torch.isfinite(p).all() for p in t.engine.module.parameters())
        assert torch.isfinite(t.head.weight).all() and not torch.equal(w_before, t.head.weight)
        assert any(not torch.equal(params[n], p) for n, p in t.engine.module.named_parameters())
        text = t.metrics.exposition()
        assert 'pfc_skipped_steps_total{rank="0"} 2.0' in text
        log = (t.run_dir / "train_rank0.log").read_text()
        assert log.count("skipped: loss is nan") == 2
    finally:
        t.close()


def test_skipped_step_leaves_weights_untouched(tmp_path):
    """A skipped step changes nothing: the run equals one whose poisoned step never happened."""
    t = Trainer(_cfg(tmp_path, **{"run.max_steps": 1}), handle_signals=False)
    try:
        _poison(t, {1})
        before = {k: v.detach().clone() for k, v in t.engine.module.state_dict().items()}
        w = t.head.weight.detach().clone()
        t.fit()
        after = t.engine.module.state_dict()
        # BatchNorm running statistics do move in the forward pass; parameters must not.
        names = {n for n, _ in t.engine.module.named_parameters()}
        assert all(torch.equal(before[n], after[n]) for n in names)
        assert torch.equal(w, t.head.weight.detach())
        assert t.state.skipped_steps == 1 and t.state.step == 1
    finally:
        t.close()


def test_too_many_nonfinite_steps_stop_with_a_clear_error(tmp_path):
    t = Trainer(_cfg(tmp_path, **{"run.max_nonfinite_steps": 3}), handle_signals=False)
    try:
        _poison(t, set(range(1, 100)))
        with pytest.raises(NonFiniteLossError, match=r"3 consecutive steps .*run.max_nonfinite_steps = 3"):
            t.fit()
        assert t.state.step == 3
    finally:
        t.close()


def test_malicious_verification_bin_is_refused(tmp_path):
    """A .bin whose pickle would run code is rejected before anything runs."""
    from dali_pipelines import UnsafePickleError

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.bin"
    evil.write_bytes(pickle.dumps(([Evil()], [True]), protocol=2))
    with pytest.raises(UnsafePickleError, match="evil.bin"):
        Trainer(_cfg(tmp_path, **{"evaluation.bin_files": f'["{evil}"]'}), handle_signals=False)
    assert not marker.exists()


def test_missing_training_file_names_the_fix(tmp_path):
    cfg = _cfg(tmp_path, **{"data.kind": '"dali"', "data.train_rec": f'"{tmp_path / "nope.rec"}"'})
    with pytest.raises(FileNotFoundError, match="pfc synth"):
        Trainer(cfg, handle_signals=False)


def test_export_cli_from_a_run(tmp_path):
    """`pfc export` rebuilds the backbone from the run's config and checkpoint, ONNX included."""
    from train.cli import main

    t = Trainer(_cfg(tmp_path, **{"run.max_steps": 2}), handle_signals=False)
    try:
        t.fit()
    finally:
        t.close()
    out = tmp_path / "exported"
    assert main(["export", "--checkpoint", str(tmp_path / "inproc"), "--out", str(out), "--onnx"]) == 0
    state = torch.load(out / "backbone.pt", weights_only=True)
    assert state["metadata"]["step"] == "2" and state["metadata"]["backbone"] == "iresnet_nano"
    assert (out / "model.onnx").is_file()
    sd = t.engine.module.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in state["state_dict"].items())
    assert not math.isnan(float(next(iter(state["state_dict"].values())).float().sum()))

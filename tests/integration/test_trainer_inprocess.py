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
        # Parameters and buffers alike: the BatchNorm running statistics the skipped step's forward
        # moved are put back (with a diverged backbone they would be NaN).
        assert before.keys() == after.keys()
        assert [k for k in before if not torch.equal(before[k], after[k])] == []
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


# ------------------------------------------------------------------------------ recovery points
def _nonfinite_values(path) -> int:
    sd = torch.load(path / "backbone.pt", weights_only=True)["model"]
    return sum(int((~torch.isfinite(v)).sum()) for v in sd.values() if v.is_floating_point())


def test_diverging_run_keeps_a_finite_checkpoint_and_resumes_with_a_lower_lr(tmp_path):
    """optimizer.lr=1e6: saves during the non-finite streak are left out (they used to hold NaN
    BatchNorm statistics, and retention deleted the only good checkpoint); the error names the
    good one, and a rerun with a sane lr resumes from it with a fresh non-finite count."""
    from train.checkpoint import read_manifest

    sets = {"optimizer.lr": "1e6", "checkpoint.every_steps": 4, "checkpoint.keep_last": 1,
            "run.max_nonfinite_steps": 5, "run.max_steps": 16}
    t = Trainer(_cfg(tmp_path, **sets), handle_signals=False)
    try:
        with pytest.raises(NonFiniteLossError) as info:
            t.fit()
        assert t.state.skipped_saves >= 1
    finally:
        t.close()
    root = tmp_path / "inproc" / "checkpoints"
    steps = sorted(root.glob("step_*"))
    assert [p.name for p in steps] == ["step_000000004"], steps
    assert f"the last good checkpoint is {steps[0]}" in str(info.value)
    m = read_manifest(steps[0])
    assert m["finite"] is True and m["verified_step"] == 4 and _nonfinite_values(steps[0]) == 0
    log = (tmp_path / "inproc" / "train_rank0.log").read_text()
    assert "checkpoint of step 8 not written" in log

    t = Trainer(_cfg(tmp_path, **{**sets, "optimizer.lr": "1e-3", "run.max_steps": 8}), handle_signals=False)
    try:
        assert t.resumed_from == steps[0] and t.state.consecutive_nonfinite == 0
        summary = t.fit()
    finally:
        t.close()
    assert summary["step"] == 8 and summary["checkpoint"].endswith("step_000000008")


def test_refused_resume_leaves_the_run_directory_untouched(tmp_path):
    """An incompatible checkpoint is refused before config.toml/derived.toml are rewritten, so the
    run directory still describes its checkpoints (pfc export/eval kept working)."""
    from train.checkpoint import CheckpointError

    t = Trainer(_cfg(tmp_path, **{"run.max_steps": 2}), handle_signals=False)
    try:
        t.fit()
    finally:
        t.close()
    run = tmp_path / "inproc"
    before = {n: (run / n).read_bytes() for n in ("config.toml", "derived.toml")}
    with pytest.raises(CheckpointError, match="embedding_size=128, the head has 64"):
        Trainer(_cfg(tmp_path, **{"backbone.num_features": 64, "head.embedding_size": 64}), handle_signals=False)
    assert {n: (run / n).read_bytes() for n in before} == before
    from train.cli import main  # and so `pfc export` still rebuilds the right backbone

    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "exported")]) == 0


def _flip_a_byte(step_dir) -> None:
    f = sorted(step_dir.glob("head_classes_*.pt"))[0]
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))


def test_auto_resume_falls_back_past_a_damaged_checkpoint_and_says_so(tmp_path):
    from train.checkpoint import CheckpointError

    sets = {"run.max_steps": 4, "checkpoint.every_steps": 2, "checkpoint.keep_last": 0}
    t = Trainer(_cfg(tmp_path, **sets), handle_signals=False)
    try:
        t.fit()
    finally:
        t.close()
    root = tmp_path / "inproc" / "checkpoints"
    _flip_a_byte(root / "step_000000004")  # sha256 failure: it used to block auto-resume
    t = Trainer(_cfg(tmp_path, **sets), handle_signals=False)
    try:
        assert t.resumed_from == root / "step_000000002" and t.state.step == 2
    finally:
        t.close()
    log = (tmp_path / "inproc" / "train_rank0.log").read_text()
    assert f"auto-resume falls back from {root / 'step_000000004'}" in log and f"to {root / 'step_000000002'}" in log

    _flip_a_byte(root / "step_000000002")  # now none is valid
    with pytest.raises(CheckpointError, match='no valid checkpoint in .*checkpoint.resume = "auto-or-fresh"'):
        Trainer(_cfg(tmp_path, **sets), handle_signals=False)
    t = Trainer(_cfg(tmp_path, **{**sets, "checkpoint.resume": '"auto-or-fresh"'}), handle_signals=False)
    try:
        assert t.resumed_from is None and t.state.step == 0
    finally:
        t.close()
    log = (tmp_path / "inproc" / "train_rank0.log").read_text()
    assert "auto-or-fresh\": no valid checkpoint" in log


def _train_args(tmp_path, **sets):
    base = {
        "run.output_dir": f'"{tmp_path}"', "run.name": '"cli"', "run.max_steps": 1,
        "data.kind": '"synthetic"', "data.train_rec": '""', "data.batch_size": 8,
        "data.synth.identities": 20, "data.synth.images_per_identity": 8,
        "evaluation.bin_files": "[]", "evaluation.every_steps": 0, "metrics.prometheus": "false",
        "metrics.progress_bar": "false", "export.onnx": "false",
    }
    base.update({k: str(v) for k, v in sets.items()})
    return ["train", "--no-export"] + [a for k, v in base.items() for a in ("--set", f"{k}={v}")]


def test_checkpoint_and_data_errors_are_one_line_exit_2(tmp_path, capsys, monkeypatch):
    """They ended in a traceback with exit 1; config errors already got a message and exit 2."""
    from train.cli import main

    monkeypatch.delenv("PFC_TRACEBACK", raising=False)
    missing = tmp_path / "no_such_checkpoint"
    assert main(_train_args(tmp_path, **{"checkpoint.resume": f'"{missing}"'})) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and f"{missing} is not a checkpoint directory" in err.splitlines()[-1]

    rec = tmp_path / "garbage.rec"
    rec.write_bytes(bytes(range(256)) * 8)
    rec.with_suffix(".idx").write_text("0\t0\n1\t512\n")
    args = _train_args(tmp_path, **{"data.kind": '"torch"', "data.train_rec": f'"{rec}"', "run.name": '"cli2"'})
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and "garbage.rec" in err.splitlines()[-1] and "offset 0" in err

    monkeypatch.setenv("PFC_TRACEBACK", "1")  # the traceback on demand, same exit code
    assert main(args) == 2
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_a_state_with_non_finite_values_is_never_saved(tmp_path):
    t = Trainer(_cfg(tmp_path, **{"run.max_steps": 1}), handle_signals=False)
    try:
        with torch.no_grad():
            t.head.weight[3, 1] = float("inf")
        assert t.save() is None and t.state.skipped_saves == 1
        assert not list((tmp_path / "inproc" / "checkpoints").glob("step_*"))
        with torch.no_grad():
            t.head.weight[3, 1] = 0.0
        assert t.save() is not None
    finally:
        t.close()
    log = (tmp_path / "inproc" / "train_rank0.log").read_text()
    assert "checkpoint of step 0 not written: the model, head or optimizer state holds non-finite values" in log

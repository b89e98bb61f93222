"""Device-to-host reads of an ordinary training step: only those of train/host_syncs.py.

Every Python-level read of a tensor (``item``, ``__float__``, ``__int__``, ``__bool__``,
``__index__``, ``tolist``, ``cpu``) made during two non-logging optimizer steps is counted by the
file and function that made it. On a GPU each is a stall of the launch queue, so a read that is not
documented (or more of them than documented) fails here, on CPU.
"""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import torch

from train.config import load_config
from train.host_syncs import STEP_HOST_SYNCS, check_counts, count_host_reads
from train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]


def _cfg(tmp_path, *extra):
    sets = {
        "run.output_dir": f'"{tmp_path}"', "run.name": '"syncs"', "run.max_steps": 4, "run.log_every": 100,
        "data.kind": '"synthetic"', "data.train_rec": '""', "data.batch_size": 8,
        "data.synth.identities": 20, "data.synth.images_per_identity": 8, "checkpoint.resume": '"none"',
        "evaluation.bin_files": "[]", "evaluation.every_steps": 0, "checkpoint.every_steps": 0,
        "metrics.prometheus": "false", "metrics.progress_bar": "false", "export.onnx": "false",
    }
    return load_config("cpu_demo", [f"{k}={v}" for k, v in sets.items()] + list(extra))


def count_step_reads(trainer: Trainer, steps=(2, 3)) -> collections.Counter:
    """Reads made from the end of optimizer step ``steps[0] - 1`` to the end of ``steps[-1]``."""
    with count_host_reads() as counter:
        def on_step(step, _images):
            counter.active = steps[0] - 1 <= step < steps[-1]

        trainer.fit(on_step=on_step)
    return counter.counts


def _check(counts: collections.Counter, steps: int) -> None:
    problems = check_counts(counts, steps)
    assert not problems, "\n".join(problems)
    assert counts[("train/trainer/step.py", "optimizer_step")] == steps  # exactly one verdict per step


@pytest.mark.parametrize("extra", [
    (),  # cpu_demo: s6 (bank, contrastive, concentration), sample_rate 0.5, lazy rows
    ('head.method="arcface"', "head.sample_rate=1.0", 'head.row_update="dense"'),
])
def test_ordinary_step_reads_only_documented_values(tmp_path, extra):
    t = Trainer(_cfg(tmp_path, *extra), handle_signals=False)
    try:
        counts = count_step_reads(t)
    finally:
        t.close()
    _check(counts, steps=2)


def test_the_count_catches_a_read(tmp_path):
    """The harness is not blind: a stray ``.item()`` in the step is reported."""
    t = Trainer(_cfg(tmp_path, 'head.method="arcface"'), handle_signals=False)
    forward = t.head.forward

    def chatty(emb, labels):
        out = forward(emb, labels)
        out["loss"].detach().item()
        return out

    t.head.forward = chatty
    try:
        counts = count_step_reads(t)
    finally:
        t.close()
    assert counts[("tests/unit/test_host_syncs.py", "chatty")] == 2
    with pytest.raises(AssertionError, match="not listed"):
        _check(counts, steps=2)


def test_documentation_lists_every_entry():
    text = (ROOT / "docs" / "training.md").read_text()
    for s in STEP_HOST_SYNCS:
        assert f"`{s.file}`" in text and f"`{s.function}`" in text, s

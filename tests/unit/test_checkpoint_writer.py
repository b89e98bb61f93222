"""The asynchronous checkpoint writer: same checkpoint as the synchronous save, a staged copy that
training may change at once, hashes taken while writing, failures raised at wait(), and a crash
at any moment of the background write leaves the previous checkpoint the newest."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from partial_fc.distributed import ParallelContext
from train import checkpoint as ck
from train.checkpoint import async_writer as cw
from train.checkpoint import CheckpointError, find_latest, read_manifest

from .test_checkpoint import _job, _load, _save


def _async(root, step, job, **kw):
    head, backbone, hopt, bopt = job
    writer = cw.AsyncCheckpointWriter(root, ParallelContext.from_group(None))
    path = writer.save(step, head, hopt, backbone=backbone, backbone_optimizer=bopt, **kw)
    return writer, path


def test_async_save_equals_the_synchronous_one(tmp_path):
    job = _job(steps=2)
    sync = _save(tmp_path / "sync", 2, job, extra_state={"epoch": 1})
    writer, path = _async(tmp_path / "async", 2, job, extra_state={"epoch": 1})
    assert writer.wait() == path and path.name == sync.name
    ms, ma = read_manifest(sync), read_manifest(path)
    assert ms["files"].keys() == ma["files"].keys() and ms["shards"] == ma["shards"]
    assert sorted(p.name for p in path.iterdir()) == sorted(p.name for p in sync.iterdir())  # no report files left
    extra, (head, backbone, hopt, _) = _load(path)  # verify=True: the hashes taken while writing hold
    assert extra == {"epoch": 1}
    for (k, a), b in zip(job[0].state_dict().items(), head.state_dict().values()):
        assert torch.equal(a, b), k
    assert torch.equal(hopt.state[head.weight]["momentum_buffer"], job[2].state[job[0].weight]["momentum_buffer"])
    assert torch.equal(backbone.weight, job[1].weight)
    assert (tmp_path / "async" / "latest").read_text().strip() == path.name


def test_staged_copy_is_isolated_from_training(tmp_path, monkeypatch):
    job = _job(steps=1)
    before = job[0].weight.detach().clone()
    gate = threading.Event()
    orig = cw._write_file

    def held(obj, path):
        gate.wait(30)
        return orig(obj, path)

    monkeypatch.setattr(cw, "_write_file", held)
    writer, path = _async(tmp_path, 1, job)
    assert writer.busy
    with torch.no_grad():  # training goes on while the thread has not written anything yet
        job[0].weight.add_(1.0)
        job[2].state[job[0].weight]["momentum_buffer"].zero_()
    gate.set()
    writer.wait()
    _, (head, _, hopt, _) = _load(path)
    assert torch.equal(head.weight.detach(), before)
    assert bool(hopt.state[head.weight]["momentum_buffer"].abs().sum() > 0)


def test_failed_write_raises_at_wait_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    writer, first = _async(tmp_path, 1, _job())
    writer.wait()
    orig = cw._write_file

    def failing(obj, path):
        if path.name == ck.BACKBONE_FILE:
            raise OSError(28, "No space left on device")
        return orig(obj, path)

    monkeypatch.setattr(cw, "_write_file", failing)
    job = _job(steps=2)
    path = writer.save(2, job[0], job[2], backbone=job[1], backbone_optimizer=job[3])
    with pytest.raises(CheckpointError, match="No space left on device"):
        writer.wait()
    assert not path.exists()
    assert find_latest(tmp_path) == first
    assert not any(".tmp-" in p.name for p in tmp_path.iterdir())  # abandoned cleanly


def test_checkpoint_in_progress_is_invisible_until_committed(tmp_path, monkeypatch):
    """While the thread writes (any moment before the rename), the previous checkpoint is the
    newest complete one; the new one appears whole."""
    writer, first = _async(tmp_path, 1, _job())
    writer.wait()
    gate, reached = threading.Event(), threading.Event()
    orig = cw._write_file

    def slow(obj, path):
        rec = orig(obj, path)
        if path.name == ck.BACKBONE_FILE:  # part of the new checkpoint is on disk
            reached.set()
            gate.wait(30)
        return rec

    monkeypatch.setattr(cw, "_write_file", slow)
    job = _job(steps=2)
    path = writer.save(2, job[0], job[2], backbone=job[1], backbone_optimizer=job[3])
    assert reached.wait(30)
    with pytest.warns(UserWarning, match="interrupted save"):
        assert find_latest(tmp_path) == first
    assert not path.exists()
    gate.set()
    writer.wait()
    assert find_latest(tmp_path) == path
    _load(path)


def test_keep_as_best_survives_retention(tmp_path):
    writer = cw.AsyncCheckpointWriter(tmp_path, ParallelContext.from_group(None))
    paths = []
    for step in (1, 2, 3):
        job = _job(steps=step)
        paths.append(writer.save(step, job[0], job[2], backbone=job[1], backbone_optimizer=job[3], keep_last=1))
        writer.wait()
        if step == 2:
            kept = job[0].weight.detach().clone()
            ck.keep_as_best(paths[-1], tmp_path, {"metric": "v/accuracy", "value": 0.9, "step": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "latest", "step_000000003"]
    assert find_latest(tmp_path).name == "step_000000003"  # best is not a step directory
    assert ck.read_best(tmp_path) == {"metric": "v/accuracy", "value": 0.9, "step": 2}
    _, (head, *_rest) = _load(tmp_path / "best")
    assert torch.equal(head.weight.detach(), kept)
    assert json.loads((tmp_path / "best" / "manifest.json").read_text())["step"] == 2


def test_keep_best_key_lookup():
    from train.trainer import _lookup_eval

    results = {"verification": {"accuracy": 0.91, "tar": {"0.001": 0.5, "0.0001": 0.25}, "step": 4}}
    assert _lookup_eval(results, "verification/accuracy") == 0.91
    assert _lookup_eval(results, "verification/tar/1e-4") == 0.25  # FAR targets match as numbers
    assert _lookup_eval({}, "verification/accuracy") != _lookup_eval({}, "verification/accuracy")  # nan: no eval here
    with pytest.raises(ValueError, match="there are: verification/accuracy, verification/tar/0.001"):
        _lookup_eval(results, "lfw/accuracy")
    with pytest.raises(ValueError, match="names a group"):
        _lookup_eval(results, "verification/tar")

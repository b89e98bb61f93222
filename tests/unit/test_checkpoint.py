"""Single-process checkpoint tests: atomicity (interrupted saves, SIGKILL), integrity, retention,
clear errors, and weights_only safety."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from partial_fc import PartialFCHead
from train.checkpoint import (CheckpointError, check_checkpoint, export_backbone_state, find_latest, load_checkpoint,
                              save_checkpoint)
from train.checkpoint import format as ckformat
from train.checkpoint import reader as ckreader
from train.checkpoint import retention as ckretention
from train.checkpoint import writer as ckwriter

ROOT = Path(__file__).resolve().parents[2]
HEAD = dict(num_classes=11, embedding_size=8, method="s6", seed=3)


def _job(steps: int = 1, **head_kw):
    head = PartialFCHead(**{**HEAD, **head_kw})
    backbone = nn.Linear(6, head.config.embedding_size)
    hopt = torch.optim.SGD(head.parameters(), lr=0.5, momentum=0.9)
    bopt = torch.optim.SGD(backbone.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(12, 6, generator=g)
        y = torch.randint(0, head.config.num_classes, (12,), generator=g)
        head(backbone(x), y)["loss"].backward()
        hopt.step()
        bopt.step()
    return head, backbone, hopt, bopt


def _save(root, step, job, **kw):
    head, backbone, hopt, bopt = job
    return save_checkpoint(root, step, head, hopt, backbone=backbone, backbone_optimizer=bopt, **kw)


def _load(path, **head_kw):
    head, backbone, hopt, bopt = _job(steps=0, **head_kw)
    extra = load_checkpoint(path, head, hopt, backbone=backbone, backbone_optimizer=bopt)
    return extra, (head, backbone, hopt, bopt)


def test_round_trip_single_process(tmp_path):
    job = _job(steps=2)
    path = _save(tmp_path, 2, job, extra_state={"epoch": 4, "pos": [1, 2]})
    extra, (head, backbone, hopt, _) = _load(path)
    assert extra == {"epoch": 4, "pos": [1, 2]}
    for (k, a), b in zip(job[0].state_dict().items(), head.state_dict().values()):
        assert torch.equal(a, b), k
    assert torch.equal(hopt.state[head.weight]["momentum_buffer"], job[2].state[job[0].weight]["momentum_buffer"])
    assert torch.equal(backbone.weight, job[1].weight)


def test_find_latest_ignores_incomplete_directories(tmp_path):
    good = _save(tmp_path, 1, _job())
    tmp = tmp_path / "step_000000002.tmp-deadbeef"  # an interrupted save
    tmp.mkdir()
    (tmp / "head_classes_000000000_000000011.pt").write_bytes(b"PK\x03\x04half")
    (tmp_path / "step_000000003").mkdir()  # a directory without manifest
    (tmp_path / "step_000000003" / "backbone.pt").write_bytes(b"x")
    with pytest.warns(UserWarning) as record:
        assert find_latest(tmp_path) == good
    text = " ".join(str(w.message) for w in record)
    assert "step_000000002.tmp-deadbeef" in text and "step_000000003 has no manifest.json" in text
    assert find_latest(tmp_path / "nothing-here") is None


def test_corrupted_and_truncated_files_are_detected(tmp_path):
    path = _save(tmp_path, 1, _job())
    shard = path / "head_classes_000000000_000000011.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 integrity check"):
        _load(path)
    shard.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        _load(path)
    with pytest.warns(UserWarning, match="truncated"):
        assert find_latest(tmp_path) is None


def test_keep_last_and_latest_pointer(tmp_path):
    job = _job()
    for step in range(1, 6):
        _save(tmp_path, step, job, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000000004", "step_000000005"]
    assert (tmp_path / "latest").read_text().strip() == "step_000000005"
    _save(tmp_path, 5, job, keep_last=None)  # re-saving a step replaces it
    assert find_latest(tmp_path).name == "step_000000005"


def test_clear_errors(tmp_path):
    path = _save(tmp_path, 1, _job())
    with pytest.raises(CheckpointError, match="num_classes=11, the head has 12"):
        _load(path, num_classes=12)
    with pytest.raises(CheckpointError, match="embedding_size=8, the head has 16"):
        _load(path, embedding_size=16)
    with pytest.raises(CheckpointError, match="replicated head state"):
        _load(path, temperature="learnable")  # log_tau missing from the checkpoint
    with pytest.raises(CheckpointError, match="class-sharded state: missing"):
        _load(path, method="arcface")  # no bank
    with pytest.raises(CheckpointError, match="does not exist"):
        _load(tmp_path / "step_000000099")
    (path / "backbone.pt").unlink()
    with pytest.raises(CheckpointError, match="backbone.pt is missing"):
        _load(path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["format_version"] = 99
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="format version 99"):
        _load(path)


def test_unsafe_extra_state_is_refused_before_writing(tmp_path):
    with pytest.raises(TypeError, match=r"extra_state\['sampler'\] is a .*object"):
        _save(tmp_path / "root", 1, _job(), extra_state={"sampler": object()})
    assert not (tmp_path / "root").exists()


class _Evil:
    """Would create a file when unpickled without weights_only."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_rejected(tmp_path):
    path = _save(tmp_path, 1, _job())
    marker = tmp_path / "pwned"
    shard = "head_classes_000000000_000000011.pt"
    torch.save({"start": 0, "end": 11, "state": _Evil(str(marker)), "optim": {}}, path / shard)
    # The attacker controls the whole directory, so the manifest agrees with the file: integrity
    # passes and only weights_only stands between the file and code execution.
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"][shard] = {"size": (path / shard).stat().st_size, "sha256": ckformat._sha256(path / shard)}
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="weights_only"):
        _load(path)
    assert not marker.exists()


def test_export_backbone_state_unwraps(tmp_path):
    job = _job()
    _save(tmp_path, 1, job)
    state = export_backbone_state(tmp_path)  # a root resolves to its latest checkpoint
    assert set(state) == {"weight", "bias"} and torch.equal(state["weight"], job[1].weight)


_KILL_SCRIPT = """
import sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from tests.unit.test_checkpoint import _job, _save
from train.checkpoint import writer as ckwriter

root = Path({ckroot!r})
job = _job()
_save(root, 1, job)
orig = ckwriter._save_file
def slow(obj, path):
    rec = orig(obj, path)
    if path.name == "backbone.pt":  # half of the new checkpoint is on disk
        Path({marker!r}).touch()
        time.sleep(60)
    return rec
ckwriter._save_file = slow
_save(root, 2, _job(steps=2))
"""


def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path):
    ckroot, marker = tmp_path / "ckpts", tmp_path / "writing"
    script = _KILL_SCRIPT.format(root=str(ROOT), ckroot=str(ckroot), marker=str(marker))
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, "the saving process died early"
            assert time.monotonic() < deadline, "the save never reached the write"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert any(".tmp-" in p.name for p in ckroot.iterdir()), "the interrupted save left its tmp dir"
    with pytest.warns(UserWarning, match="interrupted save"):
        latest = find_latest(ckroot)
    assert latest.name == "step_000000001"
    assert (ckroot / "latest").read_text().strip() == "step_000000001"
    _load(latest)
    _save(ckroot, 2, _job())  # the next save succeeds and clears the stale tmp dir
    assert sorted(p.name for p in ckroot.iterdir()) == ["latest", "step_000000001", "step_000000002"]


# ------------------------------------------------------------------------------ damage and retention
def _flip_a_byte(path: Path) -> None:
    f = path / "head_classes_000000000_000000011.pt"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size: only the sha256 tells
    f.write_bytes(bytes(data))


def test_retention_counts_only_verified_checkpoints(tmp_path):
    """A corrupt checkpoint that still has its manifest never takes the place of a good one: with
    keep_last=2, saving 600 after a good 500 and a corrupt 558 keeps 500 (it deleted 500 before)."""
    job = _job()
    _save(tmp_path, 400, job, keep_last=2)
    _save(tmp_path, 500, job, keep_last=2)
    _flip_a_byte(_save(tmp_path, 558, job, keep_last=None))
    ckreader._HASH_VERIFIED.clear()  # as in a new process (a restarted job)
    _save(tmp_path, 600, job, keep_last=2)
    names = sorted(p.name for p in tmp_path.glob("step_*"))
    assert names == ["step_000000500", "step_000000558", "step_000000600"], names
    _save(tmp_path, 700, job, keep_last=2)  # the corrupt one goes once it is older than the kept ones
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_000000600", "step_000000700"]


def test_retention_never_deletes_the_newest_good_checkpoint(tmp_path):
    job = _job()
    _save(tmp_path, 1, job, keep_last=1, finite=True)
    bad = _save(tmp_path, 2, job, keep_last=None, finite=False)  # recorded as non-finite
    _flip_a_byte(_save(tmp_path, 3, job, keep_last=None))
    ckreader._HASH_VERIFIED.clear()
    (tmp_path / "step_000000004").mkdir()  # incomplete
    ckretention._prune(tmp_path, 1, tmp_path / "step_000000099")
    assert (tmp_path / "step_000000001").is_dir() and bad.is_dir()
    with pytest.warns(UserWarning):
        assert find_latest(tmp_path).name == "step_000000003"  # cheap check: sizes only
    with pytest.raises(CheckpointError, match="non-finite"):
        check_checkpoint(bad, _job(steps=0)[0])


def test_manifest_records_finite_and_verified_step(tmp_path):
    m = json.loads((_save(tmp_path, 7, _job(), finite=True) / "manifest.json").read_text())
    assert m["finite"] is True and m["verified_step"] == 7
    assert "finite" not in json.loads((_save(tmp_path, 8, _job()) / "manifest.json").read_text())


def test_check_checkpoint_finds_what_load_would_refuse_without_changing_anything(tmp_path):
    path = _save(tmp_path, 1, _job(steps=2))
    head, backbone, hopt, _ = _job(steps=0)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    assert check_checkpoint(path, head, hopt, backbone=backbone)["step"] == 1
    with pytest.raises(CheckpointError, match="embedding_size=8, the head has 4"):
        check_checkpoint(path, PartialFCHead(**{**HEAD, "embedding_size": 4}))
    with pytest.raises(CheckpointError, match="different backbone"):
        check_checkpoint(path, head, backbone=nn.Linear(5, 8))
    with pytest.raises(CheckpointError, match="Adam"):
        check_checkpoint(path, head, torch.optim.Adam(head.parameters()))
    _flip_a_byte(path)
    with pytest.raises(CheckpointError, match="sha256"):
        check_checkpoint(path, head)
    assert all(torch.equal(before[k], v) for k, v in head.state_dict().items())


def test_full_disk_names_the_file(tmp_path, monkeypatch):
    """ENOSPC in the middle of torch.save used to surface as `unexpected pos A vs B`."""
    import builtins
    import errno

    _save(tmp_path, 1, _job())

    class FullDisk:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            self.n += len(b)
            if self.n > 2000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fake_open(path, mode="r", *a, **kw):
        f = builtins.open(path, mode, *a, **kw)
        return FullDisk(f) if "w" in mode and str(path).endswith(".pt") else f

    monkeypatch.setattr(ckwriter, "open", fake_open, raising=False)
    with pytest.raises(CheckpointError, match=r"no space left on device: .*step_000000002\.tmp-\w+/\S+\.pt"):
        _save(tmp_path, 2, _job())
    monkeypatch.undo()
    assert find_latest(tmp_path).name == "step_000000001"  # the previous checkpoint is intact
    assert not list(tmp_path.glob("*.tmp-*"))

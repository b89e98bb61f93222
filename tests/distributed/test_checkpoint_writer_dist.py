"""The asynchronous writer on 2 gloo ranks: each rank writes its own files in its thread, rank 0
commits from the report files, the result loads on 1 and 3 ranks; a write failing on one rank
makes every rank raise at wait() and leaves the previous checkpoint the newest."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from partial_fc import PartialFCHead
from tests.harness import run_distributed

HEAD = dict(num_classes=13, embedding_size=8, method="s6", seed=5)


def _save_two(rank, world_size, root, fail_rank=None):
    from partial_fc.distributed import ParallelContext
    from train.checkpoint import async_writer as cw
    from train.checkpoint import CheckpointError, find_latest

    head = PartialFCHead(**HEAD)
    backbone = nn.Linear(4, 8)
    hopt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(rank)
    head(backbone(torch.randn(6, 4, generator=g)), torch.randint(0, 13, (6,), generator=g))["loss"].backward()
    hopt.step()
    writer = cw.AsyncCheckpointWriter(root, ParallelContext.from_group(None), commit_timeout_s=60)
    first = writer.save(1, head, hopt, backbone=backbone, extra_state={"k": 1})
    writer.wait()
    w1 = head.weight.detach().clone()
    if fail_rank is not None and rank == fail_rank:
        def failing(obj, path):
            raise OSError(28, "No space left on device")
        cw._write_file = failing
    with torch.no_grad():
        head.weight.add_(1.0)
    second = writer.save(2, head, hopt, backbone=backbone, extra_state={"k": 2})
    error = None
    try:
        writer.wait()
    except CheckpointError as e:
        error = str(e)
    latest = find_latest(root)
    return {"first": str(first), "second": str(second), "error": error, "latest": str(latest),
            "w1": w1, "range": (head.class_start, head.num_local_classes)}


def _load(rank, world_size, path):
    from train.checkpoint import load_checkpoint

    head = PartialFCHead(**HEAD)
    hopt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    extra = load_checkpoint(path, head, hopt, backbone=nn.Linear(4, 8))
    return {"extra": extra, "weight": head.weight.detach().clone(), "start": head.class_start}


def test_async_save_on_two_ranks_loads_anywhere(tmp_path):
    root = tmp_path / "ck"
    res = run_distributed(_save_two, 2, tmp_path, root=str(root))
    assert all(r["error"] is None for r in res) and res[0]["latest"].endswith("step_000000002")
    full = torch.cat([r["w1"] for r in res]) + 1.0  # step 2 holds the weights after the in-place change
    for world in (1, 3):
        loaded = run_distributed(_load, world, tmp_path, path=res[0]["latest"])
        assert all(r["extra"] == {"k": 2} for r in loaded)
        assert torch.equal(torch.cat([r["weight"] for r in loaded]), full)
    assert not any(".tmp-" in p.name or "report_rank" in p.name for p in root.rglob("*"))


@pytest.mark.parametrize("fail_rank", [0, 1])
def test_a_failed_write_on_one_rank_raises_on_every_rank(tmp_path, fail_rank):
    root = tmp_path / "ck"
    res = run_distributed(_save_two, 2, tmp_path, root=str(root), fail_rank=fail_rank)
    for r in res:
        assert r["error"] is not None and f"rank {fail_rank}" in r["error"] and "No space left" in r["error"], r
        assert r["latest"].endswith("step_000000001")
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000000001"]

"""Loader contract: sharding, equal batch counts, resume, reshuffle, DALI == torch, bad images."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from dali_pipelines import CorruptImageError, FaceRecordDataset, build_train_loader
from dali_pipelines.sampling import batches_per_epoch, epoch_order

from .conftest import write_insightface


def _collect(loader) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
    xs, ys = [], []
    for x, y in loader:
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


@pytest.mark.parametrize("tail", ["drop", "pad"])
@pytest.mark.parametrize("n,world,bs", [(101, 3, 4), (32, 4, 8), (7, 2, 3)])
def test_shards_disjoint_cover_equal(n: int, world: int, bs: int, tail: str) -> None:
    orders = [epoch_order(n, batch_size=bs, rank=r, world_size=world, seed=1, epoch=2, tail=tail)[0]
              for r in range(world)] if not (tail == "drop" and n < bs * world) else None
    if orders is None:
        with pytest.raises(ValueError, match="cannot fill one global batch"):
            epoch_order(n, batch_size=bs, rank=0, world_size=world, seed=1, epoch=2, tail=tail)
        return
    nb = batches_per_epoch(n, bs, world, tail)
    assert all(len(o) == nb * bs for o in orders)  # same number of full batches on every rank
    allv = np.concatenate(orders)
    if tail == "drop":
        assert len(np.unique(allv)) == len(allv)  # disjoint
        assert len(allv) == (n // (bs * world)) * bs * world
    else:
        assert set(allv.tolist()) == set(range(n))  # cover everything
        assert len(allv) - len(np.unique(allv)) == nb * bs * world - n  # only pad repeats


def test_epochs_reshuffle_deterministically() -> None:
    a0 = epoch_order(100, batch_size=5, rank=0, world_size=2, seed=7, epoch=0)
    a0b = epoch_order(100, batch_size=5, rank=0, world_size=2, seed=7, epoch=0)
    a1 = epoch_order(100, batch_size=5, rank=0, world_size=2, seed=7, epoch=1)
    b0 = epoch_order(100, batch_size=5, rank=0, world_size=2, seed=8, epoch=0)
    assert np.array_equal(a0[0], a0b[0]) and np.array_equal(a0[1], a0b[1])
    assert not np.array_equal(a0[0], a1[0]) and not np.array_equal(a0[0], b0[0])
    # With drop, over two ranks an epoch covers every sample exactly once.
    both = np.concatenate([a1[0], epoch_order(100, batch_size=5, rank=1, world_size=2, seed=7, epoch=1)[0]])
    assert sorted(both.tolist()) == list(range(100))


@pytest.mark.parametrize("kind", ["torch", "dali"])
def test_loader_sharding_and_equal_batches(tiny_rec: Path, kind: str) -> None:
    ds = FaceRecordDataset(tiny_rec)
    world, bs = 3, 4
    seen = []
    lens = []
    for rank in range(world):
        L = build_train_loader(kind, dataset=ds, batch_size=bs, rank=rank, world_size=world,
                               num_workers=0 if kind == "torch" else 1, seed=5)
        x, y = _collect(L)
        lens.append((len(L), len(y)))
        assert x.shape == (len(y), 3, 112, 112) and x.dtype == torch.float32
        assert y.dtype == torch.int64
        idx, _ = epoch_order(len(ds), batch_size=bs, rank=rank, world_size=world, seed=5, epoch=0)
        assert y.tolist() == ds.labels[idx].tolist()
        seen.append(idx)
    assert lens == [(2, 8)] * 3  # 32 images, global batch 12 -> 2 batches per rank, 8 dropped
    allv = np.concatenate(seen)
    assert len(np.unique(allv)) == 24


@pytest.mark.parametrize("kind", ["torch", "dali"])
def test_resume_yields_exactly_remaining(tiny_rec: Path, kind: str) -> None:
    ds = FaceRecordDataset(tiny_rec)
    kw = dict(dataset=ds, batch_size=4, rank=1, world_size=2, seed=3,
              num_workers=0 if kind == "torch" else 1)
    full = build_train_loader(kind, **kw)  # type: ignore[arg-type]
    full.set_epoch(1)
    xs, ys = _collect(full)
    assert full.state_dict() == {"epoch": 2, "position": 0}

    part = build_train_loader(kind, **kw)  # type: ignore[arg-type]
    part.set_epoch(1)
    it = iter(part)
    next(it)
    state = part.state_dict()
    assert state == {"epoch": 1, "position": 4}
    del it
    resumed = build_train_loader(kind, **kw)  # type: ignore[arg-type]
    resumed.load_state_dict(state)
    assert resumed.remaining_batches() == len(resumed) - 1
    rx, ry = _collect(resumed)
    assert torch.equal(ry, ys[4:])
    assert torch.allclose(rx, xs[4:])
    with pytest.raises(ValueError, match="multiple of batch_size"):
        resumed.set_epoch(0, position=3)


def test_dali_cpu_matches_torch_fallback(tmp_path: Path) -> None:
    rec = write_insightface(tmp_path / "m.rec", ids=6, per_id=4)
    ds = FaceRecordDataset(rec)
    outs = {}
    for kind in ("torch", "dali"):
        L = build_train_loader(kind, dataset=ds, batch_size=8, seed=11, num_workers=2)
        outs[kind] = _collect(L)
    (xt, yt), (xd, yd) = outs["torch"], outs["dali"]
    assert torch.equal(yt, yd)
    diff = (xt - xd).abs()
    assert diff.max().item() <= 2 / 127.5 and diff.mean().item() < 1e-3
    # The flips really happened (same flags on both paths): some images are mirrored.
    idx, flips = epoch_order(len(ds), batch_size=8, rank=0, world_size=1, seed=11, epoch=0)
    assert flips.any() and (~flips).any()


@pytest.mark.parametrize("kind", ["torch", "dali"])
@pytest.mark.parametrize("dtype,fmt", [(torch.float16, torch.contiguous_format),
                                       (torch.bfloat16, torch.channels_last),
                                       (torch.float32, torch.channels_last)])
def test_dtype_and_memory_format(tiny_rec: Path, kind: str, dtype: torch.dtype, fmt: torch.memory_format) -> None:
    ds = FaceRecordDataset(tiny_rec)
    L = build_train_loader(kind, dataset=ds, batch_size=8, dtype=dtype, memory_format=fmt,
                           num_workers=0 if kind == "torch" else 1, flip=False, shuffle=False)
    x, y = next(iter(L))
    assert x.dtype == dtype and x.shape == (8, 3, 112, 112)
    assert x.is_contiguous(memory_format=fmt)
    ref = build_train_loader("torch", dataset=ds, batch_size=8, num_workers=0, flip=False, shuffle=False)
    xr, yr = next(iter(ref))
    assert torch.equal(y, yr)
    assert (x.float() - xr).abs().max().item() < 0.02
    assert -1.0 <= x.float().min().item() and x.float().max().item() <= 1.0


@pytest.mark.parametrize("kind", ["torch", "dali"])
def test_undecodable_image_skipped_and_counted(tmp_path: Path, kind: str) -> None:
    rec = write_insightface(tmp_path / "bad.rec", ids=4, per_id=4, corrupt={(1, 2)})
    ds = FaceRecordDataset(rec)
    L = build_train_loader(kind, dataset=ds, batch_size=4, shuffle=False, flip=False,
                           num_workers=0 if kind == "torch" else 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x, y = _collect(L)
    assert L.skipped == 1
    assert any("bad.rec key 7 at offset" in str(w.message) for w in caught)
    assert len(y) == 16 and x.shape[0] == 16  # nothing else in the epoch is lost
    bad = 6  # dataset position of (identity 1, image 2)
    assert y.tolist()[:4] == [0, 0, 0, 0] and y.tolist()[8:] == [2] * 4 + [3] * 4
    assert torch.equal(x[bad], x[4])  # the slot reuses another image of its batch
    # A second epoch skips it again (counted again), still without errors.
    _collect(L)
    assert L.skipped == 2


@pytest.mark.parametrize("kind", ["torch", "dali"])
def test_undecodable_image_strict_raises(tmp_path: Path, kind: str) -> None:
    rec = write_insightface(tmp_path / "bad.rec", ids=2, per_id=4, corrupt={(0, 1)})
    L = build_train_loader(kind, rec, batch_size=4, strict=True, num_workers=0 if kind == "torch" else 1)
    with pytest.raises(CorruptImageError, match=r"bad.rec key 2 at offset \d+"):
        _collect(L)


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("position", [0, 8])
def test_dali_corrupt_image_in_first_batch_of_a_pipeline(tmp_path: Path, strict: bool, position: int) -> None:
    """The first batch of each DALI pipeline (epoch start, resume position) follows strict_decode:
    skipped and counted, or CorruptImageError naming key and offset (was a raw decoder error)."""
    pytest.importorskip("nvidia.dali")
    bad_id, bad_k = divmod(position, 4)
    rec = write_insightface(tmp_path / "bad.rec", ids=4, per_id=4, corrupt={(bad_id, bad_k + 1)})
    L = build_train_loader("dali", rec, batch_size=4, shuffle=False, flip=False, num_workers=1, strict=strict)
    L.set_epoch(0, position)
    if strict:
        with pytest.raises(CorruptImageError, match=r"bad.rec key \d+ at offset \d+"):
            _collect(L)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x, y = _collect(L)
    assert L.skipped == 1 and len(y) == 16 - position


def test_synthetic_loader() -> None:
    L = build_train_loader("synthetic", batch_size=6, num_classes=10, num_samples=60,
                           dtype=torch.bfloat16, memory_format=torch.channels_last, world_size=2, rank=1)
    assert len(L) == 5 and L.class_counts.shape == (10,)
    batches = list(L)
    assert len(batches) == 5
    x, y = batches[0]
    assert x.shape == (6, 3, 112, 112) and x.dtype == torch.bfloat16
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert y.dtype == torch.int64 and int(y.min()) >= 0 and int(y.max()) < 10
    with pytest.raises(ValueError, match="num_classes"):
        build_train_loader("synthetic", batch_size=2)


def test_loader_exposes_dataset_statistics(tiny_rec: Path) -> None:
    L = build_train_loader("torch", tiny_rec, batch_size=4, num_workers=0)
    assert L.num_classes == 8
    assert isinstance(L.class_counts, np.ndarray) and L.class_counts.tolist() == [4] * 8
    assert len(L) == 8
    with pytest.raises(ValueError, match="unknown loader kind"):
        build_train_loader("nope", tiny_rec, batch_size=4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tail"):
        build_train_loader("torch", tiny_rec, batch_size=4, tail="wrap")  # type: ignore[arg-type]


def test_pad_tail_loader(tiny_rec: Path) -> None:
    L = build_train_loader("torch", tiny_rec, batch_size=5, world_size=3, rank=2, tail="pad", num_workers=0)
    assert len(L) == 3  # ceil(32 / 15) = 3 global batches
    x, y = _collect(L)
    assert len(y) == 15

import math

import pytest
import torch

from partial_fc.sharding import ClassPartition, sample_classes, step_seed


@pytest.mark.parametrize("n,ws", [(10, 4), (10, 1), (7, 3), (2059906, 8), (5, 5)])
def test_partition_contiguous_and_complete(n, ws):
    p = ClassPartition(n, ws)
    sizes = [p.size(r) for r in range(ws)]
    assert sum(sizes) == n and max(sizes) - min(sizes) <= 1
    assert p.start(0) == 0
    for r in range(1, ws):
        assert p.start(r) == p.start(r - 1) + sizes[r - 1]
    ids = torch.arange(n) if n < 100000 else torch.tensor([0, 1, n // 2, n - 2, n - 1])
    owner = p.owner(ids)
    for c, o in zip(ids.tolist(), owner.tolist()):
        lo, hi = p.range(o)
        assert lo <= c < hi


def test_partition_ten_on_four():
    assert [ClassPartition(10, 4).size(r) for r in range(4)] == [3, 3, 2, 2]


def test_partition_rejects_bad():
    with pytest.raises(ValueError, match="at least one class"):
        ClassPartition(3, 4)
    with pytest.raises(ValueError):
        ClassPartition(0, 1)


def _gen(seed, step, rank=0):
    return torch.Generator().manual_seed(step_seed(seed, step, rank))


def test_sampling_keeps_positives_and_size():
    labels = torch.tensor([3, 5, 5, 40, 12, 19, 3])
    s = sample_classes(labels, class_start=0, num_local=20, sample_rate=0.3, generator=_gen(0, 0))
    assert s.num_sampled == math.ceil(0.3 * 20) == 6
    idx = s.index.tolist()
    assert idx == sorted(idx) and len(set(idx)) == 6
    for y in (3, 5, 12, 19):
        assert y in idx
    for i, y in enumerate(labels.tolist()):
        if y < 20:
            assert idx[int(s.target[i])] == y
        else:
            assert int(s.target[i]) == -1


def test_sampling_more_positives_than_budget():
    labels = torch.arange(10)
    s = sample_classes(labels, 0, 20, 0.1, _gen(0, 0))
    assert s.num_sampled == 10 and s.index.tolist() == list(range(10))


def test_sampling_offset_shard_and_rate_one():
    labels = torch.tensor([0, 7, 9, 12])
    s = sample_classes(labels, class_start=7, num_local=4, sample_rate=1.0)
    assert s.index is None and s.num_sampled == 4
    assert s.target.tolist() == [-1, 0, 2, -1]


def test_sampling_reproducible_and_varies_with_step():
    labels = torch.tensor([1, 2])
    a = sample_classes(labels, 0, 1000, 0.1, _gen(7, 3)).index
    b = sample_classes(labels, 0, 1000, 0.1, _gen(7, 3)).index
    c = sample_classes(labels, 0, 1000, 0.1, _gen(7, 4)).index
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_sampling_negatives_uniform():
    # Each negative should be drawn with probability (K - P) / (C - P).
    hits = torch.zeros(50)
    labels = torch.tensor([0])
    for step in range(2000):
        s = sample_classes(labels, 0, 50, 0.2, _gen(1, step))
        hits[s.index] += 1
    assert hits[0] == 2000
    freq = hits[1:] / 2000
    expected = (10 - 1) / 49
    assert torch.allclose(freq, torch.full_like(freq, expected), atol=0.04)


def test_step_seed_distinct():
    seeds = {step_seed(s, t, r) for s in range(3) for t in range(50) for r in range(4)}
    assert len(seeds) == 600

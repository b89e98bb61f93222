"""Collaborators of the training loop on their own: the epoch feed (lazy epoch rollover, positions,
equal batches) and the DDP engine's answers to the step's questions (train/engines/base.py)."""

from __future__ import annotations

import pytest
import torch

from train.engines import DDPEngine
from train.trainer.feed import EpochFeed
from train.trainer.state import TrainState


class _Loader:
    """Epochs of ``n`` batches of ``b`` samples; the batch's labels say (epoch, index)."""

    def __init__(self, n: int, b: int, last: int = 0) -> None:
        self.n, self.b, self.last = n, b, last or b
        self.calls: list[tuple[int, int]] = []

    def set_epoch(self, epoch: int, position: int) -> None:
        self.calls.append((epoch, position))
        self.epoch, self.start = epoch, position // self.b

    def __iter__(self):
        for i in range(self.start, self.n):
            size = self.last if i == self.n - 1 else self.b
            yield torch.zeros(size, 3, 2, 2), torch.full((size,), self.epoch * 100 + i)


def test_feed_rolls_over_lazily_and_counts_positions():
    state = TrainState(epoch=0, position=4)  # resumed after 2 batches of epoch 0
    loader = _Loader(n=3, b=2)
    feed = EpochFeed(loader, state, torch.device("cpu"), batch_size=2)
    _, y = feed.next()
    assert int(y[0]) == 2 and (state.epoch, state.position) == (0, 6)
    # The epoch is over, but the next epoch starts only when a batch is asked for: a checkpoint
    # here records position = the epoch's length (as the uninterrupted run would).
    assert loader.calls == [(0, 4)]
    _, y = feed.next()
    assert int(y[0]) == 100 and (state.epoch, state.position) == (1, 2)
    assert loader.calls == [(0, 4), (1, 0)]


def test_feed_refuses_a_short_batch():
    feed = EpochFeed(_Loader(n=2, b=4, last=3), TrainState(), torch.device("cpu"), batch_size=4)
    feed.next()
    with pytest.raises(ValueError, match="batch of 3 images, data.batch_size is 4"):
        feed.next()


def test_ddp_engine_answers_without_reading_the_device():
    model = torch.nn.Linear(3, 2)
    engine = DDPEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.device("cpu"), world_size=1)
    loss = model(torch.ones(4, 3)).sum() * float("nan")
    assert engine.nonfinite_loss(loss) is None  # decided later, with the step's verdict
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    with engine.micro_step_context(last=False):
        engine.micro_backward(loss, scaler, accum=2, last=False)
    assert model.weight.grad is not None
    before = model.weight.detach().clone()
    engine.null_step(clear_grads=True)  # a skipped step: nothing moves
    assert torch.equal(model.weight, before)
    assert engine.grad_norm_params() == list(model.parameters()) == engine.clip_params()
    assert engine.optimizer_state_for_checkpoint().collective is False

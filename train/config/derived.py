"""Quantities that depend on the cluster and the dataset: :class:`DerivedConfig` and :func:`derive`.

They are never written back into the config, so that the resolved ``config.toml`` of a run reloads
unchanged on a different number of ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

from .checking import ConfigError
from .train_config import TrainConfig


@dataclass(frozen=True)
class DerivedConfig:
    """Quantities computed from a config, the world size and the dataset; never part of a config.

    Attributes:
        world_size: Number of ranks.
        num_samples: Training images in the dataset.
        device: ``"cuda"`` or ``"cpu"`` (``run.device`` with ``"auto"`` resolved).
        backend: ``"nccl"`` or ``"gloo"`` (``distributed.backend`` with ``"auto"`` resolved).
        global_batch: ``data.batch_size * world_size`` (images per micro-step).
        samples_per_epoch: Images consumed per epoch (``drop_last`` drops the incomplete tail).
        steps_per_epoch: Micro-steps (data batches per rank) per epoch.
        total_micro_steps: Micro-steps of the whole run (``total_steps * grad_accumulation``).
        total_steps: Optimizer steps of the whole run (what the schedule counts).
        warmup_steps: Warm-up optimizer steps (from ``warmup_epochs`` when set), at most
            ``total_steps``.
        epochs: Epochs the run covers (fractional when ``max_steps`` decides).
        head_lr: Peak learning rate of the head.
        head_weight_decay: Weight decay of the head.
    """

    world_size: int
    num_samples: int
    device: str
    backend: str
    global_batch: int
    samples_per_epoch: int
    steps_per_epoch: int
    total_micro_steps: int
    total_steps: int
    warmup_steps: int
    epochs: float
    head_lr: float
    head_weight_decay: float


def _epoch(config: TrainConfig, world_size: int, num_samples: int) -> tuple[int, int, int]:
    """``(global_batch, steps_per_epoch, samples_per_epoch)``; ``drop_last`` drops the incomplete tail.

    Raises:
        ConfigError: With ``drop_last``, for a dataset smaller than one global batch.
    """
    global_batch = config.data.batch_size * world_size
    if config.data.drop_last:
        steps_per_epoch = num_samples // global_batch
        samples_per_epoch = steps_per_epoch * global_batch
        if steps_per_epoch == 0:
            raise ConfigError(
                f"the dataset ({num_samples} images) is smaller than one global batch ({global_batch} = "
                f"data.batch_size {config.data.batch_size} x {world_size} ranks); lower data.batch_size "
                "or set data.drop_last = false"
            )
    else:
        steps_per_epoch = -(-num_samples // global_batch)
        samples_per_epoch = num_samples
    return global_batch, steps_per_epoch, samples_per_epoch


def derive(config: TrainConfig, world_size: int, num_samples: int, *, cuda_available: bool = False) -> DerivedConfig:
    """Computes the run's :class:`DerivedConfig`.

    Per rank, a sharded reader sees ``num_samples / world_size`` images, so an epoch is
    ``floor(num_samples / global_batch)`` steps with ``drop_last`` and the ceiling without.
    ``run.max_steps`` (optimizer steps) wins over ``run.epochs``; otherwise the run has
    ``epochs * steps_per_epoch`` micro-steps, i.e. that divided by ``grad_accumulation``
    optimizer steps (an incomplete last accumulation is dropped).

    Args:
        config: The config.
        world_size: Number of ranks.
        num_samples: Training images in the dataset.
        cuda_available: Whether CUDA is usable (resolves ``"auto"`` device and backend).

    Raises:
        ConfigError: For a non-positive world size or sample count, a dataset smaller than one
            global batch with ``drop_last``, or a run with no optimizer step.
    """
    for name, value in (("world_size", world_size), ("num_samples", num_samples)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive int, got {value!r}")
    device = config.run.device
    if device == "auto":
        device = "cuda" if cuda_available else "cpu"
    backend = config.distributed.backend
    if backend == "auto":
        backend = "nccl" if device == "cuda" else "gloo"
    global_batch, steps_per_epoch, samples_per_epoch = _epoch(config, world_size, num_samples)
    accum = config.optimizer.grad_accumulation
    if config.run.max_steps is not None:
        total_steps = config.run.max_steps
    else:
        total_steps = config.run.epochs * steps_per_epoch // accum
    if total_steps < 1:
        raise ConfigError(
            f"the run has no optimizer step ({config.run.epochs} epochs x {steps_per_epoch} steps / "
            f"grad_accumulation {accum}); raise run.epochs or lower optimizer.grad_accumulation"
        )
    total_micro = total_steps * accum
    sched = config.schedule
    if sched.warmup_epochs:
        warmup = int(round(sched.warmup_epochs * steps_per_epoch / accum))
    else:
        warmup = sched.warmup_steps
    return DerivedConfig(
        world_size=world_size,
        num_samples=num_samples,
        device=device,
        backend=backend,
        global_batch=global_batch,
        samples_per_epoch=samples_per_epoch,
        steps_per_epoch=steps_per_epoch,
        total_micro_steps=total_micro,
        total_steps=total_steps,
        warmup_steps=min(warmup, total_steps),
        epochs=total_micro / steps_per_epoch,
        head_lr=config.optimizer.effective_head_lr,
        head_weight_decay=config.optimizer.effective_head_weight_decay,
    )


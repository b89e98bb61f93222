"""The ``[optimizer]``, ``[schedule]`` and ``[precision]`` sections: how the weights are updated."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from .checking import _Section

OPTIMIZERS = ("sgd", "adamw")
DECAYS = ("poly", "cosine", "constant")
DTYPES = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class OptimizerConfig(_Section):
    """The ``[optimizer]`` section.

    The backbone and the head form two parameter groups.

    Attributes:
        name: One of `"sgd"`, `"adamw"`. SGD with momentum, or AdamW.
        lr: Peak backbone learning rate.
        head_lr: Peak head learning rate.
        momentum: SGD momentum, in [0, 1).
        weight_decay: Backbone weight decay.
        head_weight_decay: Head weight decay.
        betas: AdamW betas.
        eps: AdamW epsilon.
        grad_clip: Max global gradient norm; 0 = no clipping.
        grad_accumulation: Micro-batches per optimizer step.
    """

    _SECTION = "optimizer"

    name: str = "sgd"
    lr: float = 0.1
    head_lr: Optional[float] = None
    momentum: float = 0.9
    weight_decay: float = 5e-4
    head_weight_decay: Optional[float] = None
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 0.0
    grad_accumulation: int = 1

    def _validate(self) -> None:
        self._enum("name", OPTIMIZERS)
        self._min("lr", 0.0, strict=True)
        if self.head_lr is not None:
            self._min("head_lr", 0.0, strict=True)
        if not 0.0 <= self.momentum < 1.0:
            self._fail("momentum", f"must be in [0, 1), got {self.momentum}")
        self._min("weight_decay", 0.0)
        if self.head_weight_decay is not None:
            self._min("head_weight_decay", 0.0)
        if not all(0.0 <= b < 1.0 for b in self.betas):
            self._fail("betas", f"must both be in [0, 1), got {list(self.betas)}")
        self._min("eps", 0.0, strict=True)
        self._min("grad_clip", 0.0)
        self._min("grad_accumulation", 1)

    @property
    def effective_head_lr(self) -> float:
        """``head_lr``, or ``lr`` when unset."""
        return self.lr if self.head_lr is None else self.head_lr

    @property
    def effective_head_weight_decay(self) -> float:
        """``head_weight_decay``, or ``weight_decay`` when unset."""
        return self.weight_decay if self.head_weight_decay is None else self.head_weight_decay


@dataclass(frozen=True)
class ScheduleConfig(_Section):
    """The ``[schedule]`` section.

    A linear warm-up followed by a decay, counted in optimizer steps.

    Attributes:
        warmup_steps: Warm-up length in optimizer steps.
        warmup_epochs: Warm-up length in epochs (converted by `derive`). Set at most one of the two.
        decay: One of `"poly"`, `"cosine"`, `"constant"`. Decay after the warm-up.
        power: Exponent of the polynomial decay.
        min_lr_ratio: Final learning rate as a fraction of the peak, in [0, 1].
    """

    _SECTION = "schedule"

    warmup_steps: int = 0
    warmup_epochs: float = 0.0
    decay: str = "poly"
    power: float = 2.0
    min_lr_ratio: float = 0.0

    def _validate(self) -> None:
        self._min("warmup_steps", 0)
        self._min("warmup_epochs", 0.0)
        if self.warmup_steps and self.warmup_epochs:
            self._fail("warmup_epochs", f"and schedule.warmup_steps are both set ({self.warmup_epochs} "
                                        f"and {self.warmup_steps}); keep one and set the other to 0")
        self._enum("decay", DECAYS)
        self._min("power", 0.0, strict=True)
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            self._fail("min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")


@dataclass(frozen=True)
class PrecisionConfig(_Section):
    """The ``[precision]`` section: autocast dtype and fp16 loss scaling.

    Attributes:
        dtype: One of `"fp32"`, `"bf16"`, `"fp16"`. Autocast dtype; master weights stay fp32. `fp16`
            needs CUDA.
        loss_scale: One of `"dynamic"`, float. fp16 loss scaling: dynamic, or a positive static
            scale.
        initial_scale: First dynamic scale.
        growth_interval: Steps without overflow before the dynamic scale doubles.
    """

    _SECTION = "precision"

    dtype: str = "fp32"
    loss_scale: Union[str, float] = "dynamic"
    initial_scale: float = 65536.0
    growth_interval: int = 2000

    def _validate(self) -> None:
        self._enum("dtype", DTYPES)
        if isinstance(self.loss_scale, str):
            if self.loss_scale != "dynamic":
                self._fail("loss_scale", f"must be \"dynamic\" or a positive number, got {self.loss_scale!r}")
        elif self.loss_scale <= 0:
            self._fail("loss_scale", f"must be \"dynamic\" or a positive number, got {self.loss_scale}")
        self._min("initial_scale", 0.0, strict=True)
        self._min("growth_interval", 1)


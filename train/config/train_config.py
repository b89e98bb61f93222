"""The whole config: :class:`TrainConfig` (one frozen section per concern) and its rules across sections.

Nothing is ever mutated; every change goes through :func:`dataclasses.replace`.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

from partial_fc.config import PartialFCConfig

from .checking import ConfigError, _hints, _type_name
from .input_data import DataConfig
from .model import BackboneConfig, HeadSection, ModelConfig, head_config
from .optimization import OptimizerConfig, PrecisionConfig, ScheduleConfig
from .outputs import CheckpointConfig, EvaluationConfig, ExportConfig, MetricsConfig
from .run import DistributedConfig, RunConfig


@dataclass(frozen=True)
class TrainConfig:
    """A whole training run: one frozen section per concern.

    Attributes:
        run: :class:`RunConfig`.
        distributed: :class:`DistributedConfig`.
        data: :class:`DataConfig`.
        backbone: :class:`BackboneConfig`.
        model: :class:`ModelConfig` (pretrained weights to start from).
        head: :class:`partial_fc.config.PartialFCConfig`, or :class:`HeadSection` while the class
            count is to come from the dataset (see :meth:`resolve`).
        optimizer: :class:`OptimizerConfig`.
        schedule: :class:`ScheduleConfig`.
        precision: :class:`PrecisionConfig`.
        checkpoint: :class:`CheckpointConfig`.
        evaluation: :class:`EvaluationConfig`.
        metrics: :class:`MetricsConfig`.
        export: :class:`ExportConfig`.
    """

    run: RunConfig = field(default_factory=RunConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    head: Union[PartialFCConfig, HeadSection] = field(default_factory=HeadSection)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def __post_init__(self) -> None:
        hints = _hints(TrainConfig)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, typing.get_args(hints[f.name]) or hints[f.name]):
                raise ConfigError(f"section {f.name!r} must be {_type_name(hints[f.name])}, got "
                                  f"{type(value).__name__}")
        if self.backbone.num_features != self.head.embedding_size:
            raise ConfigError(
                f"backbone.num_features ({self.backbone.num_features}) must equal head.embedding_size "
                f"({self.head.embedding_size}); set both to the same value"
            )
        resume = self.checkpoint.resume
        if self.model.init_from and resume not in ("auto", "none", "auto-or-fresh"):
            raise ConfigError(
                f"model.init_from ({self.model.init_from!r}) and checkpoint.resume ({resume!r}) both name weights "
                "to start from: init_from starts a NEW run from pretrained backbone weights (fresh head and "
                "optimizers), resume CONTINUES a run from its checkpoint (everything restored). Keep one")
        if self.checkpoint.keep_best and not self.evaluation.bin_files:
            raise ConfigError(f"checkpoint.keep_best = {self.checkpoint.keep_best!r} needs an evaluation: list "
                              "the pair sets in evaluation.bin_files")
        if self.run.device == "cpu":
            if self.distributed.backend == "nccl":
                raise ConfigError("distributed.backend = \"nccl\" needs CUDA but run.device = \"cpu\"; "
                                  "use backend \"gloo\" or \"auto\"")
            if self.precision.dtype == "fp16":
                raise ConfigError("precision.dtype = \"fp16\" needs CUDA but run.device = \"cpu\"; "
                                  "use \"bf16\" or \"fp32\" on CPU")
            if self.data.kind == "dali" and self.data.dali_decode == "mixed":
                raise ConfigError("data.dali_decode = \"mixed\" needs CUDA but run.device = \"cpu\"; "
                                  "use \"cpu\" or \"auto\"")

    @property
    def is_resolved(self) -> bool:
        """Whether the head's class count is known."""
        return isinstance(self.head, PartialFCConfig)

    def resolve(self, num_classes: int) -> "TrainConfig":
        """Returns the config with ``head.num_classes`` taken from the dataset.

        A head that already has a class count must agree with the dataset.

        Raises:
            ConfigError: If the count is not positive or disagrees with the recipe.
        """
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ConfigError(f"the dataset's class count must be a positive int, got {num_classes!r}")
        if isinstance(self.head, PartialFCConfig):
            if self.head.num_classes != num_classes:
                raise ConfigError(
                    f"head.num_classes = {self.head.num_classes} but the dataset has {num_classes} "
                    "classes; fix head.num_classes or remove it to take the count from the dataset"
                )
            return self
        return dataclasses.replace(self, head=head_config(self.head, num_classes))

    @property
    def run_dir(self) -> Path:
        """The run directory ``<run.output_dir>/<run.name>``."""
        return self.run.run_dir

    @property
    def checkpoint_dir(self) -> Path:
        """``checkpoint.dir`` resolved against the run directory."""
        return self.run_dir / self.checkpoint.dir


#: The sections of a recipe, by name (the order of TrainConfig's fields).
SECTIONS: dict[str, type] = {
    "run": RunConfig,
    "distributed": DistributedConfig,
    "data": DataConfig,
    "backbone": BackboneConfig,
    "model": ModelConfig,
    "head": HeadSection,
    "optimizer": OptimizerConfig,
    "schedule": ScheduleConfig,
    "precision": PrecisionConfig,
    "checkpoint": CheckpointConfig,
    "evaluation": EvaluationConfig,
    "metrics": MetricsConfig,
    "export": ExportConfig,
}


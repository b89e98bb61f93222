"""The training configuration: typed, frozen sections composed into one :class:`TrainConfig`.

A run is described by a TOML *recipe* (``train/recipes/<name>.toml`` or any file) plus
``--set section.key=value`` overrides. :func:`load_config` reads both and builds a frozen tree;
every section validates itself when it is built and :class:`TrainConfig` checks the rules that
span sections. Unknown sections and keys are errors with a "did you mean" suggestion, in files and
in overrides alike, and so are values of the wrong type (an int is accepted where a float is due).

Where things live:

* ``checking``: :class:`ConfigError` and the type checker every section shares.
* ``run`` (``[run]``, ``[distributed]``), ``input_data`` (``[data]``, ``[data.synth]``), ``model``
  (``[backbone]``, ``[model]``, ``[head]``), ``optimization`` (``[optimizer]``, ``[schedule]``,
  ``[precision]``), ``outputs`` (``[checkpoint]``, ``[evaluation]``, ``[metrics]``, ``[export]``):
  the sections.
* ``train_config``: :class:`TrainConfig` and the rules across sections.
* ``loading``: recipes, overrides, :func:`load_config`, argparse; ``writing``: TOML out.
* ``derived``: :func:`derive`, the quantities that depend on the cluster and the dataset.
* ``docs``: generates docs/config.md from the sections' docstrings.

Importing this package has no side effects.
"""

from .checking import FLOATS_ALLOWING_INF, ConfigError
from .input_data import DataConfig, SynthDataConfig
from .derived import DerivedConfig, derive
from .loading import (
    DEFAULT_RECIPE,
    RECIPES_DIR,
    _all_keys,
    add_config_args,
    apply_overrides,
    config_from_args,
    config_from_dict,
    list_recipes,
    load_config,
    recipe_path,
)
from .model import BackboneConfig, HeadSection, ModelConfig, head_config
from .optimization import OptimizerConfig, PrecisionConfig, ScheduleConfig
from .outputs import CheckpointConfig, EvaluationConfig, ExportConfig, MetricsConfig
from .run import DistributedConfig, RunConfig
from .train_config import SECTIONS, TrainConfig
from .writing import DERIVED_NAME, RESOLVED_NAME, config_to_dict, dump_toml, write_resolved

__all__ = [
    "ConfigError",
    "FLOATS_ALLOWING_INF",
    "RunConfig",
    "DistributedConfig",
    "SynthDataConfig",
    "DataConfig",
    "BackboneConfig",
    "ModelConfig",
    "HeadSection",
    "head_config",
    "OptimizerConfig",
    "ScheduleConfig",
    "PrecisionConfig",
    "CheckpointConfig",
    "EvaluationConfig",
    "MetricsConfig",
    "ExportConfig",
    "TrainConfig",
    "SECTIONS",
    "DerivedConfig",
    "RECIPES_DIR",
    "DEFAULT_RECIPE",
    "RESOLVED_NAME",
    "DERIVED_NAME",
    "list_recipes",
    "recipe_path",
    "load_config",
    "config_from_dict",
    "apply_overrides",
    "config_to_dict",
    "dump_toml",
    "write_resolved",
    "derive",
    "add_config_args",
    "config_from_args",
]

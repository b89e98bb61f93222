"""The training configuration: typed, frozen sections composed into one :class:`TrainConfig`.

A run is described by a TOML *recipe* (``train/recipes/<name>.toml`` or any file) plus
``--set section.key=value`` overrides. :func:`load_config` reads both and builds a frozen tree;
every section validates itself in ``__post_init__`` and :class:`TrainConfig` checks the rules that
span sections. Unknown sections and keys are errors with a "did you mean" suggestion, in files and
in overrides alike, and so are values of the wrong type (an int is accepted where a float is due).

The ``head`` section *is* :class:`partial_fc.config.PartialFCConfig`. A recipe may leave
``head.num_classes`` out (or set it to 0): the head is then a :class:`PendingHead` until the
dataset is opened and :meth:`TrainConfig.resolve` returns a new config with the class count filled
in. Nothing is ever mutated; every change goes through :func:`dataclasses.replace`.

Quantities that depend on the cluster and the dataset (world size, global batch, steps per epoch,
total optimizer steps, warm-up steps) are computed by :func:`derive` into a separate
:class:`DerivedConfig` and never written back into the config, so that the resolved ``config.toml``
of a run reloads unchanged on a different number of ranks.

Importing this module has no side effects; docs/config.md documents every key.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from partial_fc.config import PartialFCConfig

__all__ = [
    "ConfigError",
    "RunConfig",
    "DistributedConfig",
    "SynthConfig",
    "DataConfig",
    "BackboneConfig",
    "PendingHead",
    "OptimizerConfig",
    "ScheduleConfig",
    "PrecisionConfig",
    "CheckpointConfig",
    "EvaluationConfig",
    "MetricsConfig",
    "ExportConfig",
    "TrainConfig",
    "DerivedConfig",
    "RECIPES_DIR",
    "DEFAULT_RECIPE",
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

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
DEFAULT_RECIPE = "cpu_demo"
RESOLVED_NAME = "config.toml"
DERIVED_NAME = "derived.toml"


class ConfigError(ValueError):
    """A recipe or an override is invalid; the message says what to change."""


# --------------------------------------------------------------------------------------------
# Type checking shared by every section
# --------------------------------------------------------------------------------------------

_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    """The evaluated field annotations of a dataclass (cached)."""
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _is_optional(tp: Any) -> bool:
    return _is_union(tp) and type(None) in typing.get_args(tp)


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "none"
    if _is_union(tp):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}s"
        return f"a list of {len(args)} {_type_name(args[0]) + 's' if len(set(args)) == 1 else 'values'}"
    return {bool: "bool", int: "int", float: "float", str: "string"}.get(tp, getattr(tp, "__name__", str(tp)))


class _NotFiniteError(ConfigError):
    """A float field given NaN or inf."""


#: Float fields (dotted names) that accept +-inf; every other float must be finite.
FLOATS_ALLOWING_INF: frozenset[str] = frozenset()


def _check(value: Any, tp: Any, where: str) -> Any:
    """Returns ``value`` checked against ``tp`` (int -> float and list -> tuple are converted).

    Raises:
        ConfigError: If the value does not have the annotated type.
    """
    if tp is Any:
        return value
    if _is_union(tp):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check(value, arg, where)
            except _NotFiniteError:
                raise  # the right type, a bad value: say so rather than "must be float or none"
            except ConfigError:
                continue
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = float(value)
            # NaN compares false with every bound, so `lr <= 0` checks let it through (a NaN
            # grad_clip turned clipping off); inf is never a sensible setting either, except where
            # a field says so.
            if math.isnan(value) or (math.isinf(value) and where not in FLOATS_ALLOWING_INF):
                raise _NotFiniteError(f"{where} must be a finite number, got {value!r}")
            return value
    elif tp is str:
        if isinstance(value, str):
            return value
    elif typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if isinstance(value, (list, tuple)):
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_check(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
            if len(value) == len(args):
                return tuple(_check(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
            raise ConfigError(f"{where} must be {_type_name(tp)}, got {len(value)} values: {list(value)!r}")
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
    else:  # pragma: no cover - a field annotated with a type this module does not know
        raise TypeError(f"{where}: unsupported annotation {tp!r}")
    got = "none" if value is None else type(value).__name__
    raise ConfigError(f"{where} must be {_type_name(tp)}, got {got} {value!r}")


def _choice(where: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        hint = difflib.get_close_matches(str(value), list(choices), n=1)
        raise ConfigError(
            f"{where} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}"
            + (f" (did you mean {hint[0]!r}?)" if hint else "")
        )


class _Section:
    """Mix-in of the frozen sections: type check (with int->float, list->tuple), then validate.

    Subclasses set ``_SECTION`` (their dotted name, for messages) and override ``_validate``.
    """

    _SECTION = ""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            old = getattr(self, f.name)
            new = _check(old, hints[f.name], f"{self._SECTION}.{f.name}")
            if new is not old:
                object.__setattr__(self, f.name, new)  # normalising at construction, not mutation
        self._validate()

    def _fail(self, key: str, msg: str) -> None:
        raise ConfigError(f"{self._SECTION}.{key} {msg}")

    def _min(self, key: str, low: float, *, strict: bool = False) -> None:
        value = getattr(self, key)
        if value < low or (strict and value == low):
            self._fail(key, f"must be {'>' if strict else '>='} {low}, got {value!r}")

    def _enum(self, key: str, choices: Sequence[str]) -> None:
        _choice(f"{self._SECTION}.{key}", getattr(self, key), choices)

    def _validate(self) -> None:
        pass


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------

DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("auto", "nccl", "gloo")
ENGINES = ("ddp", "deepspeed")
DATA_KINDS = ("dali", "torch", "synthetic")
DALI_DECODE = ("auto", "cpu", "mixed")
OPTIMIZERS = ("sgd", "adamw")
DECAYS = ("poly", "cosine", "constant")
DTYPES = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class RunConfig(_Section):
    """The ``[run]`` section: what the run is called, where it writes and how long it lasts.

    Attributes:
        name: Run name; the run directory is ``<output_dir>/<name>``.
        output_dir: Root of the run directories (relative paths are relative to the working
            directory).
        seed: Global seed (backbone init, data order, augmentation).
        epochs: Passes over the training set; ignored when ``max_steps`` is set.
        max_steps: Optional total number of *optimizer* steps; overrides ``epochs``.
        log_every: Log (and update metrics) every this many optimizer steps.
        device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"`` or ``"cuda"``.
        max_nonfinite_steps: Stop with an error after this many optimizer steps in a row were
            skipped for a non-finite loss or gradient (isolated ones are skipped and counted).
    """

    _SECTION = "run"

    name: str = "partial-fc"
    output_dir: str = "runs"
    seed: int = 0
    epochs: int = 20
    max_steps: Optional[int] = None
    log_every: int = 50
    device: str = "auto"
    max_nonfinite_steps: int = 20

    def _validate(self) -> None:
        if not self.name or "/" in self.name or "\\" in self.name or self.name in (".", ".."):
            self._fail("name", f"must be a non-empty directory name without slashes, got {self.name!r}")
        if not self.output_dir:
            self._fail("output_dir", "must not be empty (use \".\" for the working directory)")
        self._min("seed", 0)
        self._min("epochs", 1)
        if self.max_steps is not None:
            self._min("max_steps", 1)
        self._min("log_every", 1)
        self._enum("device", DEVICES)
        self._min("max_nonfinite_steps", 1)

    @property
    def run_dir(self) -> Path:
        """``<output_dir>/<name>``: where checkpoints, logs and the resolved config go."""
        return Path(self.output_dir) / self.name


@dataclass(frozen=True)
class DistributedConfig(_Section):
    """The ``[distributed]`` section: process group and data-parallel engine.

    Attributes:
        backend: ``"auto"`` (nccl on CUDA, else gloo), ``"nccl"`` or ``"gloo"``.
        timeout_s: Collective timeout in seconds (a hung rank fails the job after this).
        engine: ``"ddp"`` (torch DistributedDataParallel) or ``"deepspeed"``.
        zero_stage: DeepSpeed ZeRO stage 0, 1 or 2 (only with ``engine = "deepspeed"``). The
            Partial FC head is model-parallel and is never sharded by ZeRO.
        find_unused_parameters: DDP's flag; only needed by backbones with unused branches.
        bucket_cap_mb: DDP gradient bucket size in MiB.
    """

    _SECTION = "distributed"

    backend: str = "auto"
    timeout_s: int = 1800
    engine: str = "ddp"
    zero_stage: int = 0
    find_unused_parameters: bool = False
    bucket_cap_mb: float = 25.0

    def _validate(self) -> None:
        self._enum("backend", BACKENDS)
        self._min("timeout_s", 1)
        self._enum("engine", ENGINES)
        if self.zero_stage not in (0, 1, 2):
            self._fail("zero_stage", f"must be 0, 1 or 2, got {self.zero_stage}")
        if self.zero_stage and self.engine != "deepspeed":
            self._fail("zero_stage", f"= {self.zero_stage} needs distributed.engine = \"deepspeed\" "
                                     "(or set zero_stage = 0 for DDP)")
        self._min("bucket_cap_mb", 0.0, strict=True)


@dataclass(frozen=True)
class SynthConfig(_Section):
    """The ``[data.synth]`` section: the demo dataset the project generates.

    The generator writes ``<out_dir>/train.rec`` + ``train.idx`` (MXNet RecordIO, one identity
    label per record) and ``<out_dir>/verification.bin`` (LFW-style pairs of held-out identities).

    Attributes:
        identities: Number of training identities.
        images_per_identity: Images generated per identity.
        seed: Generator seed (the same seed gives the same files).
        out_dir: Output directory.
        image_size: Side of the square images in pixels.
        verification_pairs: Pairs in the verification ``.bin`` (half genuine, half impostor).
    """

    _SECTION = "data.synth"

    identities: int = 100
    images_per_identity: int = 20
    seed: int = 0
    out_dir: str = "data/synth"
    image_size: int = 112
    verification_pairs: int = 400

    def _validate(self) -> None:
        self._min("identities", 2)
        self._min("images_per_identity", 2)
        self._min("seed", 0)
        if not self.out_dir:
            self._fail("out_dir", "must not be empty")
        self._min("image_size", 16)
        self._min("verification_pairs", 2)
        if self.verification_pairs % 2:
            self._fail("verification_pairs", f"must be even (half genuine, half impostor), got "
                                              f"{self.verification_pairs}")

    @property
    def train_rec(self) -> str:
        """Path of the generated training ``.rec``."""
        return str(Path(self.out_dir) / "train.rec")

    @property
    def verification_bin(self) -> str:
        """Path of the generated verification ``.bin``."""
        return str(Path(self.out_dir) / "verification.bin")

    @property
    def num_samples(self) -> int:
        """Number of training images."""
        return self.identities * self.images_per_identity


@dataclass(frozen=True)
class DataConfig(_Section):
    """The ``[data]`` section: the training set and its loader.

    Attributes:
        kind: ``"dali"`` (NVIDIA DALI reading RecordIO), ``"torch"`` (a torch DataLoader over the
            same RecordIO) or ``"synthetic"`` (random tensors made on the fly, no files: smoke and
            throughput tests; ``synth.identities`` classes, ``synth.num_samples`` per epoch).
        train_rec: Path of the training ``.rec`` (its ``.idx`` next to it) or of a shard manifest
            ``.json`` (``pfc pack --shards``). Required unless ``kind = "synthetic"``.
        batch_size: Images per rank per step (the global batch is this times the world size).
        num_workers: DataLoader worker processes (``kind = "torch"``).
        dali_threads: DALI CPU threads per rank (``kind = "dali"``).
        dali_decode: ``"auto"`` (GPU-assisted ``"mixed"`` on CUDA, else ``"cpu"``), ``"cpu"`` or
            ``"mixed"``.
        prefetch: Batches prepared ahead per rank (DALI queue depth / DataLoader prefetch).
        drop_last: Drop the last incomplete global batch of each epoch.
        flip: Random horizontal flip augmentation.
        shuffle: Reshuffle the training set every epoch.
        strict_decode: Fail on a record that does not decode; ``false`` skips and counts it.
        image_size: Side of the square training images (records of another size are
            center-cropped or padded); backbones get it as ``input_size`` when it is not 112.
        synth: Options of the generated demo dataset (see :class:`SynthConfig`).
    """

    _SECTION = "data"

    kind: str = "synthetic"
    train_rec: str = ""
    batch_size: int = 128
    num_workers: int = 4
    dali_threads: int = 4
    dali_decode: str = "auto"
    prefetch: int = 2
    drop_last: bool = True
    flip: bool = True
    shuffle: bool = True
    strict_decode: bool = True
    image_size: int = 112
    synth: SynthConfig = field(default_factory=SynthConfig)

    def _validate(self) -> None:
        self._enum("kind", DATA_KINDS)
        self._min("image_size", 16)
        if self.kind == "synthetic" and self.train_rec:
            self._fail("train_rec", f"= {self.train_rec!r} is ignored by data.kind = \"synthetic\"; set "
                                    "data.kind = \"dali\" or \"torch\" to read it, or remove train_rec")
        if self.kind != "synthetic":
            if not self.train_rec:
                self._fail("train_rec", f"is required with data.kind = {self.kind!r} (the path of a "
                                        "RecordIO .rec file), or set data.kind = \"synthetic\"")
            if not self.train_rec.endswith((".rec", ".json")):
                self._fail("train_rec", "must name a .rec file (its .idx next to it) or a shard manifest "
                                        f".json written by `pfc pack --shards`, got {self.train_rec!r}")
        self._min("batch_size", 1)
        self._min("num_workers", 0)
        self._min("dali_threads", 1)
        self._enum("dali_decode", DALI_DECODE)
        self._min("prefetch", 1)

    @property
    def train_idx(self) -> str:
        """Path of the ``.idx`` index next to ``train_rec``."""
        return str(Path(self.train_rec).with_suffix(".idx")) if self.train_rec else ""


@dataclass(frozen=True)
class BackboneConfig(_Section):
    """The ``[backbone]`` section: the data-parallel embedding network.

    Attributes:
        name: Registry name in ``partial_fc.backbones`` (e.g. ``"r50"``, ``"vit_b"``); it is
            stored as given and looked up when the model is built.
        num_features: Embedding size; must equal ``head.embedding_size``.
        dropout: Dropout before the embedding layer, in [0, 1).
        channels_last: Use the channels-last memory format (faster convolutions on GPU).
        compile: Wrap the backbone in ``torch.compile``.
    """

    _SECTION = "backbone"

    name: str = "r50"
    num_features: int = 512
    dropout: float = 0.0
    channels_last: bool = False
    compile: bool = False

    def _validate(self) -> None:
        if not self.name:
            self._fail("name", "must not be empty")
        self._min("num_features", 1)
        if not 0.0 <= self.dropout < 1.0:
            self._fail("dropout", f"must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class ModelConfig(_Section):
    """The ``[model]`` section: where the backbone's weights start.

    Attributes:
        init_from: ``""`` (random initialisation) or a path to pretrained backbone weights for
            fine-tuning: a checkpoint directory, a checkpoint root or a run directory (its newest
            complete checkpoint), or an exported ``backbone.pt``. Only the backbone's weights are
            loaded; the head, both optimizers and the schedule start fresh. A run that has a
            checkpoint of its own resumes from it instead (``checkpoint.resume = "auto"``), so a
            requeued fine-tuning job continues where it stopped.
    """

    _SECTION = "model"

    init_from: str = ""


@dataclass(frozen=True)
class OptimizerConfig(_Section):
    """The ``[optimizer]`` section (two parameter groups: backbone and head).

    Attributes:
        name: ``"sgd"`` (with momentum) or ``"adamw"``.
        lr: Peak learning rate of the backbone (for the global batch the recipe was tuned for).
        head_lr: Peak learning rate of the head; ``None`` (omitted) uses ``lr``.
        momentum: SGD momentum.
        weight_decay: Weight decay of the backbone.
        head_weight_decay: Weight decay of the head; ``None`` (omitted) uses ``weight_decay``.
        betas: AdamW betas.
        eps: AdamW epsilon.
        grad_clip: Clip the global gradient norm to this value; 0 disables clipping.
        grad_accumulation: Micro-batches accumulated per optimizer step.
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
    """The ``[schedule]`` section: linear warm-up, then decay, per optimizer step.

    Attributes:
        warmup_steps: Warm-up length in optimizer steps.
        warmup_epochs: Warm-up length in epochs (converted by :func:`derive`); set at most one of
            the two.
        decay: ``"poly"`` (``(1 - t)^power``), ``"cosine"`` or ``"constant"``.
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
        dtype: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (autocast dtype; master weights stay fp32).
        loss_scale: ``"dynamic"`` or a positive static scale (fp16 only).
        initial_scale: First dynamic loss scale.
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


@dataclass(frozen=True)
class CheckpointConfig(_Section):
    """The ``[checkpoint]`` section.

    Attributes:
        every_steps: Save every this many optimizer steps (0: only at the end).
        keep_last: Keep this many most recent checkpoints (0: keep all).
        dir: Checkpoint directory, relative to the run directory (an absolute path is used as is).
        resume: ``"auto"`` (the newest valid checkpoint in ``dir``; a fresh start when ``dir`` has
            none, an error when it has checkpoints but none is valid), ``"auto-or-fresh"`` (the
            same, but a fresh start when none is valid), ``"none"`` or a checkpoint path.
        keep_best: ``""`` (off) or an evaluation key ``"<pair set>/<figure>"`` (e.g.
            ``"verification/accuracy"``, ``"lfw/tar/0.0001"``): after each evaluation that improves
            it, the step's checkpoint is kept as ``<dir>/best`` (hard links, so no extra space while
            the step is still kept), beside the ``keep_last`` newest ones.
        keep_best_mode: ``"max"`` (higher is better) or ``"min"``.
        async_save: Write checkpoints in a background thread: training waits only while the state
            is copied into host buffers (see docs/checkpoints.md).
    """

    _SECTION = "checkpoint"

    every_steps: int = 1000
    keep_last: int = 3
    dir: str = "checkpoints"
    resume: str = "auto"
    keep_best: str = ""
    keep_best_mode: str = "max"
    async_save: bool = True

    def _validate(self) -> None:
        self._min("every_steps", 0)
        self._min("keep_last", 0)
        if not self.dir:
            self._fail("dir", "must not be empty (use \".\" for the run directory)")
        if not self.resume:
            self._fail("resume", "must be \"auto\", \"auto-or-fresh\", \"none\" or a checkpoint path")
        self._enum("keep_best_mode", ("max", "min"))
        if self.keep_best and (self.keep_best.count("/") < 1 or not all(self.keep_best.split("/"))):
            self._fail("keep_best", f"must look like \"<pair set>/<figure>\" (e.g. \"verification/accuracy\"), "
                                    f"got {self.keep_best!r}")


@dataclass(frozen=True)
class EvaluationConfig(_Section):
    """The ``[evaluation]`` section: 1:1 verification on LFW-style ``.bin`` pair sets.

    Attributes:
        every_steps: Evaluate every this many optimizer steps (0: only at the end). Nothing is
            evaluated when ``bin_files`` is empty.
        bin_files: Paths of the ``.bin`` verification sets.
        batch_size: Images per forward pass during evaluation (per rank).
        flip_test: Add the embedding of the flipped image.
        far_targets: False-accept rates at which TAR is reported, each in (0, 1).
        folds: Cross-validation folds for the accuracy (the LFW protocol uses 10).
    """

    _SECTION = "evaluation"

    every_steps: int = 0
    bin_files: tuple[str, ...] = ()
    batch_size: int = 256
    flip_test: bool = True
    far_targets: tuple[float, ...] = (1e-3, 1e-4)
    folds: int = 10

    def _validate(self) -> None:
        self._min("every_steps", 0)
        if self.every_steps and not self.bin_files:
            self._fail("every_steps", f"= {self.every_steps} but evaluation.bin_files is empty; add "
                                      ".bin files or set every_steps = 0")
        if any(not p.endswith(".bin") for p in self.bin_files):
            self._fail("bin_files", f"must all be .bin files, got {list(self.bin_files)}")
        self._min("batch_size", 1)
        if not all(0.0 < f < 1.0 for f in self.far_targets):
            self._fail("far_targets", f"must all be in (0, 1), got {list(self.far_targets)}")
        self._min("folds", 2)


@dataclass(frozen=True)
class MetricsConfig(_Section):
    """The ``[metrics]`` section: Prometheus exporter, TensorBoard, progress bar.

    Attributes:
        prometheus: Serve Prometheus metrics over HTTP.
        host: Interface the exporter binds (the default is local-only).
        port: Exporter port; 0 lets the OS pick a free one (logged and written to the run
            directory). With ``per_rank`` and a fixed port, local rank r uses ``port + r``.
        per_rank: Every rank serves its own metrics; otherwise only global rank 0 does.
        tensorboard: Write TensorBoard event files under the run directory.
        progress_bar: Show a progress bar on rank 0.
    """

    _SECTION = "metrics"

    prometheus: bool = False
    host: str = "127.0.0.1"
    port: int = 0
    per_rank: bool = False
    tensorboard: bool = False
    progress_bar: bool = True

    def _validate(self) -> None:
        if not self.host:
            self._fail("host", "must not be empty")
        if not 0 <= self.port <= 65535:
            self._fail("port", f"must be in [0, 65535] (0 = any free port), got {self.port}")


@dataclass(frozen=True)
class ExportConfig(_Section):
    """The ``[export]`` section: ONNX export of the backbone at the end of training.

    Attributes:
        onnx: Export the trained backbone to ONNX.
        opset: ONNX opset version.
        dynamic_batch: Make the batch dimension dynamic.
        output_name: File name, relative to the run directory; must end in ``.onnx``.
    """

    _SECTION = "export"

    onnx: bool = False
    opset: int = 18
    dynamic_batch: bool = True
    output_name: str = "model.onnx"

    def _validate(self) -> None:
        self._min("opset", 11)
        if not self.output_name.endswith(".onnx"):
            self._fail("output_name", f"must end in .onnx, got {self.output_name!r}")


# --------------------------------------------------------------------------------------------
# The head: PartialFCConfig, or PendingHead until the dataset is known
# --------------------------------------------------------------------------------------------

_HEAD_FIELDS = tuple(f.name for f in dataclasses.fields(PartialFCConfig))
_HEAD_OPTIONS = tuple(n for n in _HEAD_FIELDS if n != "num_classes")


def _head_error(exc: Exception) -> ConfigError:
    msg = str(exc)
    return ConfigError(msg if msg.startswith("head") else f"head: {msg}")


@dataclass(frozen=True)
class PendingHead:
    """The ``[head]`` section while ``num_classes`` is still to come from the dataset.

    It holds every other :class:`PartialFCConfig` option, already validated by PartialFCConfig
    itself; :meth:`resolve` gives the real config. Options read like attributes
    (``pending.embedding_size``) and ``num_classes`` reads ``None``.

    Attributes:
        options: ``(name, value)`` for every PartialFCConfig field except ``num_classes``, in
            field order (normalised at construction, so equal options compare equal).
    """

    options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        given = dict(self.options)
        if "num_classes" in given:
            raise ConfigError("head: PendingHead takes every option except num_classes")
        try:
            # PartialFCConfig validates everything but needs a class count; 1 is a stand-in that
            # never leaves this method.
            probe = PartialFCConfig.from_kwargs(num_classes=1, **given)
        except (TypeError, ValueError) as exc:
            raise _head_error(exc) from exc
        normalised = tuple((name, getattr(probe, name)) for name in _HEAD_OPTIONS)
        object.__setattr__(self, "options", normalised)

    @property
    def num_classes(self) -> None:
        """Always ``None``: the class count is not known yet."""
        return None

    # The derived properties of PartialFCConfig do not depend on the class count.
    @property
    def preset(self) -> Any:
        """As :attr:`PartialFCConfig.preset`."""
        return self.resolve(1).preset

    @property
    def margin_m(self) -> float:
        """As :attr:`PartialFCConfig.margin_m`."""
        return self.resolve(1).margin_m

    @property
    def needs_bank(self) -> bool:
        """As :attr:`PartialFCConfig.needs_bank`."""
        return self.resolve(1).needs_bank

    def __getattr__(self, name: str) -> Any:
        if name != "options" and not name.startswith("__"):
            for key, value in self.options:
                if key == name:
                    return value
        raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")

    def resolve(self, num_classes: int) -> PartialFCConfig:
        """The head config with ``num_classes`` filled in."""
        try:
            return PartialFCConfig.from_kwargs(num_classes=num_classes, **dict(self.options))
        except (TypeError, ValueError) as exc:
            raise _head_error(exc) from exc


HeadSection = Union[PartialFCConfig, PendingHead]


def _build_head(data: Mapping[str, Any]) -> HeadSection:
    """Builds the head section from its TOML table (keys already checked)."""
    hints = _hints(PartialFCConfig)
    opts = {k: _check(v, hints[k], f"head.{k}") for k, v in data.items()}
    num_classes = opts.pop("num_classes", None)
    if num_classes is None or num_classes == 0:
        return PendingHead(tuple(opts.items()))
    try:
        return PartialFCConfig.from_kwargs(num_classes=num_classes, **opts)
    except (TypeError, ValueError) as exc:
        raise _head_error(exc) from exc


# --------------------------------------------------------------------------------------------
# The whole config
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    """A whole training run: one frozen section per concern.

    Attributes:
        run: :class:`RunConfig`.
        distributed: :class:`DistributedConfig`.
        data: :class:`DataConfig`.
        backbone: :class:`BackboneConfig`.
        model: :class:`ModelConfig` (pretrained weights to start from).
        head: :class:`partial_fc.config.PartialFCConfig`, or :class:`PendingHead` while the class
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
    head: HeadSection = field(default_factory=PendingHead)
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
        return dataclasses.replace(self, head=self.head.resolve(num_classes))

    @property
    def run_dir(self) -> Path:
        """The run directory ``<run.output_dir>/<run.name>``."""
        return self.run.run_dir

    @property
    def checkpoint_dir(self) -> Path:
        """``checkpoint.dir`` resolved against the run directory."""
        return self.run_dir / self.checkpoint.dir


_SECTIONS: dict[str, Any] = {
    "run": RunConfig,
    "distributed": DistributedConfig,
    "data": DataConfig,
    "backbone": BackboneConfig,
    "model": ModelConfig,
    "head": PartialFCConfig,
    "optimizer": OptimizerConfig,
    "schedule": ScheduleConfig,
    "precision": PrecisionConfig,
    "checkpoint": CheckpointConfig,
    "evaluation": EvaluationConfig,
    "metrics": MetricsConfig,
    "export": ExportConfig,
}


def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def _all_keys() -> list[str]:
    """Every settable dotted key (for suggestions across sections)."""
    out: list[str] = []

    def walk(cls: type, prefix: str) -> None:
        hints = _hints(cls)
        for name in _field_names(cls):
            if dataclasses.is_dataclass(hints[name]):
                walk(hints[name], f"{prefix}{name}.")
            else:
                out.append(f"{prefix}{name}")

    for section, cls in _SECTIONS.items():
        walk(cls, f"{section}.")
    return out


def _unknown(kind: str, dotted: str, candidates: Sequence[str]) -> ConfigError:
    """An 'unknown key' error with the closest name in the same table, else anywhere."""
    prefix, _, name = dotted.rpartition(".")
    hint = [f"{prefix}.{c}" if prefix else c for c in difflib.get_close_matches(name, list(candidates), n=1)]
    if not hint and prefix:
        hint = [k for k in _all_keys() if k.rpartition(".")[2] == name][:1]
    msg = f"unknown {kind} {dotted!r}"
    if hint:
        return ConfigError(f"{msg} (did you mean {hint[0]!r}?)")
    return ConfigError(f"{msg}; known: {', '.join(candidates)}")


def _build_section(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path!r} must be a table ([{path}] with keys), got {type(data).__name__} {data!r}")
    names = _field_names(cls)
    for key in data:
        if key not in names:
            raise _unknown("key", f"{path}.{key}", names)
    if cls is PartialFCConfig:
        return _build_head(data)
    hints = _hints(cls)
    kwargs = {}
    for key, value in data.items():
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build_section(tp, value, f"{path}.{key}")
        else:
            kwargs[key] = _check(value, tp, f"{path}.{key}")
    return cls(**kwargs)


def config_from_dict(data: Mapping[str, Any]) -> TrainConfig:
    """Builds a :class:`TrainConfig` from nested plain data (a parsed TOML document).

    Missing sections and keys take their defaults; ``None`` values mean "unset" for optional keys.

    Raises:
        ConfigError: For an unknown section or key, a value of the wrong type or an invalid value.
    """
    for section in data:
        if section not in _SECTIONS:
            raise _unknown("section", section, list(_SECTIONS))
    kwargs = {}
    for section, cls in _SECTIONS.items():
        if section in data:
            kwargs[section] = _build_section(cls, data[section], section)
    return TrainConfig(**kwargs)


# --------------------------------------------------------------------------------------------
# Overrides
# --------------------------------------------------------------------------------------------


def _parse_value(raw: str, tp: Any) -> Any:
    """An override's value: a TOML literal when it parses as one, else the bare string."""
    text = raw.strip()
    if _is_optional(tp) and text.lower() in ("none", "null"):
        return None
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    wants_str = tp is str or (_is_optional(tp) and str in typing.get_args(tp) and len(typing.get_args(tp)) == 2)
    if wants_str and not isinstance(value, str):
        return text  # e.g. run.name=2024 names a run "2024"
    return value


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Returns a copy of the nested ``data`` with ``section.key=value`` overrides applied.

    Raises:
        ConfigError: For a malformed override or an unknown section or key.
    """
    tree = _deep_copy(data)
    for text in overrides:
        key, sep, raw = text.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {text!r} must look like section.key=value (e.g. data.batch_size=64)")
        parts = key.split(".")
        if parts[0] not in _SECTIONS:
            raise ConfigError(f"--set {text}: " + str(_unknown("section", parts[0], list(_SECTIONS))))
        if len(parts) == 1:
            raise ConfigError(f"--set {text}: {parts[0]!r} is a section; set one of its keys, e.g. "
                              f"{parts[0]}.{_field_names(_SECTIONS[parts[0]])[0]}=...")
        cls: type = _SECTIONS[parts[0]]
        node = tree.setdefault(parts[0], {})
        for i, part in enumerate(parts[1:], start=1):
            path = ".".join(parts[: i + 1])
            names = _field_names(cls)
            if part not in names:
                raise ConfigError(f"--set {text}: " + str(_unknown("key", path, names)))
            tp = _hints(cls)[part]
            last = i == len(parts) - 1
            if dataclasses.is_dataclass(tp):
                if last:
                    raise ConfigError(f"--set {text}: {path!r} is a section; set one of its keys, e.g. "
                                      f"{path}.{_field_names(tp)[0]}=...")
                if not isinstance(node.get(part, {}), dict):
                    raise ConfigError(f"{path!r} must be a table, got {node[part]!r}")
                node = node.setdefault(part, {})
                cls = tp
            elif not last:
                raise ConfigError(f"--set {text}: {path!r} is a key, not a section")
            else:
                node[part] = _parse_value(raw, tp)
    return tree


def _deep_copy(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in data.items()}


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def list_recipes() -> list[str]:
    """Names of the recipes shipped in ``train/recipes/``."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))


def recipe_path(path_or_name: Union[str, os.PathLike, None] = None) -> Path:
    """The file a recipe argument refers to: an existing file, else a shipped recipe's name.

    Raises:
        ConfigError: If neither exists (with the closest recipe name).
    """
    if path_or_name is None:
        path_or_name = DEFAULT_RECIPE
    path = Path(path_or_name)
    if path.is_file():
        return path
    if len(path.parts) == 1:
        shipped = RECIPES_DIR / f"{path.stem if path.suffix == '.toml' else path.name}.toml"
        if shipped.is_file():
            return shipped
        names = list_recipes()
        hint = difflib.get_close_matches(path.stem, names, n=1)
        raise ConfigError(f"no recipe file or shipped recipe named {str(path_or_name)!r}"
                          + (f" (did you mean {hint[0]!r}?)" if hint else "")
                          + f"; shipped recipes: {', '.join(names)}")
    raise ConfigError(f"recipe file {str(path)!r} does not exist")


def load_config(path_or_name: Union[str, os.PathLike, None] = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Loads a TOML recipe, applies ``section.key=value`` overrides and builds the frozen config.

    Args:
        path_or_name: A TOML file, the name of a recipe in ``train/recipes/`` (e.g.
            ``"cpu_demo"``), or ``None`` for the default recipe (``cpu_demo``).
        overrides: ``"section.key=value"`` strings applied in order; values are TOML literals
            (``64``, ``1e-3``, ``true``, ``[1, 2]``, ``"text"``) or else bare strings (``cuda``);
            ``none`` unsets an optional key. Nested keys are dotted (``data.synth.identities=50``).

    Raises:
        ConfigError: For a missing recipe, invalid TOML, unknown sections or keys, wrong types or
            invalid values; the message names the file or the override.
    """
    path = recipe_path(path_or_name)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    merged = apply_overrides(data, overrides)
    try:
        return config_from_dict(merged)
    except ConfigError as exc:
        where = f"{path} with --set {' --set '.join(overrides)}" if overrides else str(path)
        raise ConfigError(f"{where}: {exc}") from exc


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The config as nested plain data (tuples become lists; optional unset keys are ``None``).

    An unresolved head has no ``num_classes`` key. ``config_from_dict`` of the result equals
    ``cfg``.
    """
    def section(obj: Any) -> dict[str, Any]:
        if isinstance(obj, PendingHead):
            return {k: _plain(v) for k, v in obj.options}
        return {
            f.name: section(getattr(obj, f.name)) if dataclasses.is_dataclass(getattr(obj, f.name))
            else _plain(getattr(obj, f.name))
            for f in dataclasses.fields(obj)
        }

    return {f.name: section(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _toml_str(s: str) -> str:
    out = []
    for ch in s:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _toml_str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as TOML")


def _toml_key(key: str) -> str:
    return key if key and all(c.isalnum() or c in "_-" for c in key) else _toml_str(key)


def _emit_table(lines: list[str], name: str, table: Mapping[str, Any]) -> None:
    scalars = [(k, v) for k, v in table.items() if not isinstance(v, Mapping) and v is not None]
    subtables = [(k, v) for k, v in table.items() if isinstance(v, Mapping)]
    if name:
        if lines:
            lines.append("")
        lines.append(f"[{name}]")
    for key, value in scalars:
        lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for key, value in subtables:
        _emit_table(lines, f"{name}.{_toml_key(key)}" if name else _toml_key(key), value)


def dump_toml(cfg: Union[TrainConfig, Mapping[str, Any]], header: str = "") -> str:
    """Writes a config (or nested plain data) as TOML; ``None`` values are left out.

    Args:
        cfg: The config, or nested plain data.
        header: Optional comment lines put first (each prefixed with ``# ``).
    """
    data = config_to_dict(cfg) if isinstance(cfg, TrainConfig) else cfg
    lines: list[str] = [f"# {line}".rstrip() for line in header.splitlines()]
    if lines:
        lines.append("")
    body: list[str] = []
    _emit_table(body, "", data)
    return "\n".join(lines + body) + "\n"


def write_resolved(cfg: TrainConfig, run_dir: Union[str, os.PathLike], derived: Optional["DerivedConfig"] = None) -> Path:
    """Writes ``config.toml`` (the full resolved config) into ``run_dir`` and returns its path.

    ``load_config(<run_dir>/config.toml)`` gives back an equal config. With ``derived``, the
    derived quantities go to a separate ``derived.toml`` (for reading only: they are never loaded
    back into a config).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / RESOLVED_NAME
    header = ("Resolved configuration of this run (defaults and overrides applied).\n"
              "Reload with: train.config.load_config(\"<this file>\"); see docs/config.md.")
    tmp = path.with_suffix(".toml.tmp")
    tmp.write_text(dump_toml(cfg, header=header), encoding="utf-8")
    os.replace(tmp, path)
    if derived is not None:
        (run_dir / DERIVED_NAME).write_text(
            dump_toml({"derived": dataclasses.asdict(derived)},
                      header="Derived from config.toml, the world size and the dataset size; not a recipe."),
            encoding="utf-8",
        )
    return path


# --------------------------------------------------------------------------------------------
# Derived quantities
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def add_config_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds ``--config/-c RECIPE`` and repeatable ``--set section.key=value`` to ``parser``."""
    parser.add_argument(
        "-c", "--config", "--recipe", dest="config", default=None, metavar="RECIPE",
        help=f"TOML recipe file, or the name of a shipped recipe ({', '.join(list_recipes())}); "
             f"default: {DEFAULT_RECIPE}",
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override one config key (repeatable), e.g. --set data.batch_size=64 "
             "--set head.method=arcface; see docs/config.md",
    )
    return parser


def config_from_args(ns: argparse.Namespace) -> TrainConfig:
    """Loads the config named by the arguments :func:`add_config_args` added."""
    return load_config(getattr(ns, "config", None), getattr(ns, "overrides", None) or ())

"""The ``[run]`` and ``[distributed]`` sections: naming, length and device of a run; process group."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .checking import _Section

DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("auto", "nccl", "gloo")
ENGINES = ("ddp", "deepspeed")


@dataclass(frozen=True)
class RunConfig(_Section):
    """The ``[run]`` section: what the run is called, where it writes and how long it lasts.

    Attributes:
        name: Run name; the run directory is `<output_dir>/<name>` (no slashes).
        output_dir: Root of the run directories.
        seed: Global seed (backbone init, data order, augmentation).
        epochs: Passes over the training set; ignored when `max_steps` is set.
        max_steps: Total optimizer steps; overrides `epochs`.
        log_every: Log and update metrics every N optimizer steps.
        device: One of `"auto"`, `"cpu"`, `"cuda"`. `auto` picks CUDA when available.
        max_nonfinite_steps: Stop with an error after this many optimizer steps in a row skipped for
            a non-finite loss or gradient; isolated ones are skipped and counted.
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
        backend: One of `"auto"`, `"nccl"`, `"gloo"`. `auto`: nccl on CUDA, else gloo. `nccl` with
            `run.device = "cpu"` is an error.
        timeout_s: Collective timeout in seconds; a hung rank fails the job after this.
        engine: One of `"ddp"`, `"deepspeed"`. Data-parallel engine for the backbone.
        zero_stage: One of 0, 1, 2. DeepSpeed ZeRO stage; non-zero needs `engine = "deepspeed"`. The
            model-parallel head is never sharded by ZeRO.
        find_unused_parameters: DDP flag for backbones with unused branches.
        bucket_cap_mb: DDP gradient bucket size (MiB).
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


"""What a run writes: the ``[checkpoint]``, ``[evaluation]``, ``[metrics]`` and ``[export]`` sections."""

from __future__ import annotations

from dataclasses import dataclass

from .checking import _Section


@dataclass(frozen=True)
class CheckpointConfig(_Section):
    """The ``[checkpoint]`` section.

    Attributes:
        every_steps: Save every N optimizer steps; 0 = only at the end.
        keep_last: Keep the N most recent; 0 = keep all.
        dir: Relative to the run directory (`TrainConfig.checkpoint_dir`).
        resume: `"auto"`: the newest valid checkpoint in `dir` (falling back past damaged or
            incompatible ones, with a warning in the run log); a fresh start when `dir` has no
            checkpoint, an error (exit 2) when it has some but none is valid. `"auto-or-fresh"`: the
            same, but a fresh start when none is valid. `"none"`, or a checkpoint path. See
            docs/checkpoints.md, *Failure model*.
        keep_best: An evaluation key `"<pair set>/<figure>"` (e.g. `"verification/accuracy"`,
            `"verification/tar/0.0001"`): the checkpoint of the best evaluation so far is kept as
            `<dir>/best` (hard links, so no extra space while the step is still kept), beside the newest
            ones. `""` = off. Needs `evaluation.bin_files`.
        keep_best_mode: `"max"` (higher is better) or `"min"`.
        async_save: Write checkpoints in the background: training waits only for the copy of the
            state into host buffers ([checkpoints.md](checkpoints.md#asynchronous-saves)).
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
        every_steps: Evaluate every N optimizer steps; 0 = only at the end. Non-zero with no
            `bin_files` is an error.
        bin_files: LFW-style `.bin` verification sets; empty = no evaluation.
        batch_size: Images per forward pass (per rank).
        flip_test: Add the embedding of the flipped image.
        far_targets: FARs at which TAR is reported, each in (0, 1).
        folds: Cross-validation folds for the accuracy (10 is the LFW protocol).
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

    **Why port 0 by default:** a fixed port collides when two runs (or two CI jobs, or the ranks of
    a ``per_rank`` run) share a host, and a failed bind should not kill a training job. An
    ephemeral port always binds, and the port actually chosen is reported. The GPU recipes, which a
    Prometheus server scrapes at a known address, set ``port = 9400`` explicitly.

    Attributes:
        prometheus: Serve Prometheus metrics over HTTP.
        host: Interface to bind; local-only by default.
        port: `0` lets the OS pick a free port, which is logged and written to the run directory.
            With `per_rank` and a fixed port, local rank r binds `port + r`.
        per_rank: Every rank serves its own metrics; otherwise only global rank 0.
        tensorboard: TensorBoard event files under the run directory.
        progress_bar: Progress bar on rank 0.
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
        onnx: Export the trained backbone to ONNX at the end.
        opset: ONNX opset (>= 11).
        dynamic_batch: Dynamic batch dimension.
        output_name: File name in the run directory; must end in `.onnx`.
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


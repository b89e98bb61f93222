"""What a run writes: the ``[checkpoint]``, ``[evaluation]``, ``[metrics]`` and ``[export]`` sections."""

from __future__ import annotations

from dataclasses import dataclass

from .checking import _Section


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


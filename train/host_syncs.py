"""The device-to-host reads an ordinary (non-logging) training step is allowed to make.

On a GPU every read of a device value from Python (``.item()``, ``float(t)``, ``int(t)``,
``bool(t)``, ``.tolist()``, ``.cpu()``) waits for the launch queue to drain. An ordinary step makes
only the reads listed here; statistics and losses stay device tensors until a log step reads them.
docs/training.md ("Host syncs") explains each entry; tests/unit/test_host_syncs.py counts the reads
of a training step on CPU and fails on any read not listed here, or on more reads than listed.

Reads that ``torch`` makes internally for data-dependent shapes (``torch.nonzero``,
``torch.unique``, boolean-mask indexing) are not Python reads and are not counted; they are listed
in docs/training.md too.
"""

from __future__ import annotations

import collections
import contextlib
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

__all__ = ["HostSync", "STEP_HOST_SYNCS", "READ_METHODS", "HostReadCounter", "count_host_reads", "check_counts"]

ROOT = Path(__file__).resolve().parents[1]
#: The ``torch.Tensor`` methods through which Python reads a device value.
READ_METHODS = ("item", "__float__", "__int__", "__bool__", "__index__", "tolist", "cpu")


@dataclass(frozen=True)
class HostSync:
    """One place that reads the device on every step.

    Attributes:
        file: Path relative to the repository root.
        function: The function (``co_name``) that makes the read.
        per_step: Reads per optimizer step at one micro-step, one 4096-class chunk and one rank
            (the test's configuration); ``unit`` says how it scales.
        unit: What one read is counted per.
        why: What the host needs the value for.
    """

    file: str
    function: str
    per_step: int
    unit: str
    why: str


STEP_HOST_SYNCS: tuple[HostSync, ...] = (
    HostSync("train/trainer/step.py", "optimizer_step", 1, "optimizer step",
             "the step's verdict: global gradient norm, non-finite loss, bad labels or embeddings and "
             "the stop request, all-reduced together and read once to decide step / skip / stop"),
    HostSync("partial_fc/sharding.py", "sample_classes", 1, "sampling call (sample_rate < 1)",
             "number of sampled classes K = max(ceil(rate * C_local), positives): the shape of the "
             "sampled logits"),
    HostSync("partial_fc/fused.py", "forward", 1, "4096-class chunk of the margin softmax",
             "whether any raw cosine left [-1, 1]; only then are the positions searched (clamp's "
             "zero gradient)"),
    HostSync("partial_fc/optim.py", "sparse_rows", 1, "row-sparse gradient (head.row_update = lazy)",
             "whether the gradient's rows are already sorted and unique, which saves a coalesced "
             "[K, D] copy"),
    HostSync("partial_fc/fused_contrastive.py", "forward", 1, "contrastive loss call (s5, s6)",
             "whether any sampled cluster center is still invalid (one masked pass instead of one "
             "per chunk)"),
    HostSync("partial_fc/cluster.py", "update", 1, "bank update (methods with a bank)",
             "whether this shard owns any sample of the batch (nothing to update otherwise)"),
    HostSync("partial_fc/cluster.py", "concentration_stats", 2, "bank statistics (methods with a bank)",
             "the global phi range (torch.histc takes its bounds as host numbers) and then the "
             "percentile bounds, means and count, read together"),
)


class HostReadCounter:
    """Counts of Python-level tensor reads by ``(file relative to the repository, function)``.

    ``active`` switches counting on and off (e.g. only during non-logging steps). A read made inside
    torch or another library is attributed to the innermost calling frame in this repository.
    """

    def __init__(self) -> None:
        self.counts: collections.Counter = collections.Counter()
        self.active = False

    def record(self) -> None:
        root = str(ROOT)
        for fr in reversed(traceback.extract_stack()[:-2]):
            path = str(Path(fr.filename).resolve())
            if path.startswith(root + "/") and not path.endswith("train/host_syncs.py"):
                self.counts[(str(Path(path).relative_to(ROOT)), fr.name)] += 1
                return
        self.counts[("<outside the repository>", "?")] += 1


@contextlib.contextmanager
def count_host_reads() -> Iterator[HostReadCounter]:
    """Wraps :data:`READ_METHODS` of ``torch.Tensor`` while the block runs (restored after).

    Works on any device (on CPU no read waits, but the same Python calls are made), so a test can
    count the reads a GPU step would wait on.
    """
    import torch

    counter = HostReadCounter()
    originals = {n: getattr(torch.Tensor, n) for n in READ_METHODS}

    def wrap(fn):
        def read(self, *args, **kwargs):
            if counter.active:
                counter.record()
            return fn(self, *args, **kwargs)

        return read

    for name, fn in originals.items():
        setattr(torch.Tensor, name, wrap(fn))
    try:
        yield counter
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


def check_counts(counts: "collections.Counter", steps: int) -> list[str]:
    """Problems with ``counts`` taken over ``steps`` ordinary steps; empty when all is documented."""
    allowed = {(s.file, s.function): s.per_step * steps for s in STEP_HOST_SYNCS}
    problems = []
    for key, n in sorted(counts.items()):
        if key not in allowed:
            problems.append(f"{key[0]}:{key[1]} reads the device {n} time(s) in {steps} step(s) and is not "
                            "listed in train/host_syncs.py")
        elif n > allowed[key]:
            problems.append(f"{key[0]}:{key[1]} reads the device {n} time(s) in {steps} step(s), "
                            f"{allowed[key]} documented")
    return problems

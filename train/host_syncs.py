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

from dataclasses import dataclass

__all__ = ["HostSync", "STEP_HOST_SYNCS"]


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
    HostSync("train/trainer.py", "_optimizer_step", 1, "optimizer step",
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

"""Every series the training metrics export, declared once.

A step's metrics are one flat dict ``{key: float}`` (e.g. ``{"step": 120, "loss/total": 2.31,
"loss/ce": 1.9, "lr/backbone": 0.1, "time/forward_s": 0.05, "train/grad_norm": 3.2, ...}``). Each
key is matched against :data:`SERIES`: a key with ``{label}`` parts is a family (its parts become
Prometheus labels). The key is also the TensorBoard tag and the ``metrics.jsonl`` field, and the
``prom`` name the Prometheus series (every Prometheus series also carries a ``rank`` label).
docs/observability.md has this table in prose.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

__all__ = ["Series", "SERIES", "PHASES", "PHASE_BUCKETS", "match"]

PHASES = ("data", "forward", "backward", "optimizer")
PHASE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass(frozen=True)
class Series:
    """One exported series.

    Attributes:
        key: The flat-dict key (``{name}`` parts are labels), TensorBoard tag and JSONL field.
        prom: The Prometheus name (a counter is exposed as ``<prom>_total``).
        kind: ``"gauge"``, ``"counter"`` (the flat value is the cumulative count) or ``"histogram"``.
        help: The Prometheus HELP text.
        unit: Unit of the value.
        tensorboard: Whether the key is written to TensorBoard.
        fallback: Used only for keys no other series matches.
        initial: A series without family labels is exported from the start at 0; ``None``: only
            once a value arrives (the CUDA-only series).
    """

    key: str
    prom: str
    kind: str
    help: str
    unit: str = ""
    tensorboard: bool = True
    fallback: bool = False
    initial: Optional[float] = 0.0
    labels: tuple[str, ...] = field(init=False)
    pattern: "re.Pattern[str]" = field(init=False, repr=False)

    def __post_init__(self) -> None:
        labels = tuple(re.findall(r"\{(\w+)\}", self.key))
        regex = "".join(f"(?P<{p[1:-1]}>[^/]+)" if p.startswith("{") else re.escape(p)
                        for p in re.split(r"(\{\w+\})", self.key) if p)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "pattern", re.compile(f"^{regex}$"))


G, C, H = "gauge", "counter", "histogram"
SERIES: tuple[Series, ...] = (
    Series("world_size", "pfc_world_size", G, "Number of ranks in the job.", "ranks", tensorboard=False),
    Series("step", "pfc_step", G, "Latest optimizer step (global step counter).", "steps", tensorboard=False),
    Series("train/epoch", "pfc_epoch", G, "Current epoch.", "epochs"),
    Series("loss/{term}", "pfc_loss", G, "Latest loss value; term=total is the optimised sum, ce/con/ali its "
           "terms (unweighted)."),
    Series("lr/{group}", "pfc_learning_rate", G, "Current learning rate per parameter group."),
    Series("perf/images_per_s", "pfc_images_per_second", G, "Training throughput of this rank (images/s).",
           "images/s"),
    Series("time/step_s", "pfc_step_seconds", G, "Wall time of the latest step (sum of phases unless given).",
           "s"),
    Series("time/{phase}_s", "pfc_step_phase_seconds", G, "Time of the latest step's phase.", "s"),
    Series("time/{phase}_s", "pfc_step_phase_duration_seconds", H, "Distribution of step phase times.", "s",
           tensorboard=False),
    Series("train/grad_norm", "pfc_grad_norm", G, "Total gradient norm before clipping."),
    Series("train/loss_scale", "pfc_loss_scale", G, "Mixed-precision loss scale (1 without AMP scaling)."),
    Series("train/skipped_steps", "pfc_skipped_steps", C, "Optimizer steps skipped (non-finite loss or "
           "gradients).", "steps", tensorboard=False),
    Series("train/nonfinite_consecutive", "pfc_nonfinite_consecutive_steps", G, "Consecutive non-finite steps "
           "right now (0 once a finite step follows).", "steps", tensorboard=False),
    Series("data/skipped_records", "pfc_skipped_records", C, "Data records skipped by the data layer (corrupt, "
           "undecodable or filtered).", "records", tensorboard=False),
    Series("head/phi_{stat}", "pfc_head_phi", G, "Concentration (phi) statistics of this rank's class shard."),
    Series("head/margin_{stat}", "pfc_head_margin", G, "Additive angular margin applied to the latest step's "
           "targets.", "rad"),
    Series("head/num_sampled_local", "pfc_head_sampled_classes", G, "Classes sampled on this rank's shard in "
           "the latest step.", "classes"),
    Series("head/tau", "pfc_head_temperature", G, "Learnable contrastive temperature tau."),
    Series("head/{stat}", "pfc_head_stat", G, "Other numeric head statistics by key.", fallback=True),
    Series("memory/{kind}_bytes", "pfc_memory_bytes", G, "Memory: allocated/reserved/peak on CUDA, "
           "rss/peak_rss of the process.", "bytes"),
    Series("memory/cuda_alloc_retries", "pfc_cuda_alloc_retries", G, "CUDA caching allocator: allocations "
           "that failed and were retried after freeing cached blocks (cumulative; torch.cuda.memory_stats "
           "num_alloc_retries). CUDA only.", "retries", initial=None),
    Series("memory/cuda_ooms", "pfc_cuda_ooms", G, "CUDA caching allocator: out-of-memory errors raised "
           "(cumulative; torch.cuda.memory_stats num_ooms). CUDA only.", "errors", initial=None),
    Series("eval/{set}/accuracy", "pfc_eval_accuracy", G, "Verification accuracy per evaluation set."),
    Series("eval/{set}/tar@far={far}", "pfc_eval_tar", G, "True accept rate at a false accept rate per "
           "evaluation set."),
    Series("eval/{set}/step", "pfc_eval_step", G, "Step of the latest evaluation of a set.", "steps",
           tensorboard=False),
    Series("eval/{set}/{metric}", "pfc_eval_metric", G, "Other evaluation results.", fallback=True),
    Series("last_update", "pfc_last_update_timestamp_seconds", G, "Unix time of the latest update (for stall "
           "alerts).", "s", tensorboard=False),
)


def match(key: str) -> list[tuple[Series, dict[str, str]]]:
    """The series a flat key feeds, with its labels: an exact key wins over families, a family over
    a fallback family. Empty for a key no series declares."""
    hits = [(s, m.groupdict()) for s in SERIES if (m := s.pattern.match(key))]
    exact = [h for h in hits if not h[0].labels]
    if exact:
        return exact
    primary = [h for h in hits if not h[0].fallback]
    return primary or hits


def tensorboard_key(key: str) -> Optional[bool]:
    """Whether ``key`` goes to TensorBoard (``None`` when no series declares it)."""
    hits = match(key)
    return any(s.tensorboard for s, _ in hits) if hits else None

"""Concentration phi and the resulting per-class margins, read from a training checkpoint.

The head is rebuilt in this process (one rank) from the run's ``config.toml``, the checkpoint is
loaded into it (any saved world size; see docs/checkpoints.md), and
:meth:`partial_fc.PartialFCHead.class_margins` turns phi into margins with the method's own code:
the global phi statistics, the normalised concentration lambda, the warm-up and unseen-class rules
and the registered margin function. So the figures show exactly the margins the next training
step would apply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

__all__ = ["ConcentrationReport", "class_concentration", "concentration_by_difficulty"]


@dataclass
class ConcentrationReport:
    """Per-class concentration and margins of one checkpoint.

    Attributes:
        method: The head's method (e.g. ``s6``).
        margin: The registered margin behind it (e.g. ``cg_arcface``).
        step: Head steps taken.
        uses_concentration: Whether the margin depends on phi at all.
        warmup_active: Whether the step is still inside ``margin_warmup_steps`` (constant margin).
        phi: ``[C]`` concentration per class, NaN where unknown (or no bank).
        lam: ``[C]`` normalised concentration in ``[0, 1]``, NaN where unknown.
        m2: ``[C]`` additive angular margin (radians) per class.
        m3: ``[C]`` additive cosine margin per class.
    """

    method: str
    margin: str
    step: int
    uses_concentration: bool
    warmup_active: bool
    phi: np.ndarray = field(repr=False)
    lam: np.ndarray = field(repr=False)
    m2: np.ndarray = field(repr=False)
    m3: np.ndarray = field(repr=False)

    @property
    def num_classes(self) -> int:
        return int(self.phi.shape[0])

    @property
    def num_known(self) -> int:
        return int(np.isfinite(self.phi).sum())

    def to_dict(self) -> dict:
        """JSON-ready summary (distribution statistics, not the per-class arrays)."""
        return {
            "method": self.method, "margin": self.margin, "step": self.step, "num_classes": self.num_classes,
            "num_known_phi": self.num_known, "uses_concentration": self.uses_concentration,
            "warmup_active": self.warmup_active, "phi": _stats(self.phi), "lambda": _stats(self.lam),
            "margin_m2": _stats(self.m2), "margin_m3": _stats(self.m3),
            "corr_phi_m2": _corr(self.phi, self.m2),
        }


def _stats(x: np.ndarray) -> Optional[dict]:
    v = x[np.isfinite(x)]
    if v.size == 0:
        return None
    q = np.percentile(v, [10, 50, 90])
    return {"count": int(v.size), "min": float(v.min()), "p10": float(q[0]), "median": float(q[1]),
            "p90": float(q[2]), "max": float(v.max()), "mean": float(v.mean()), "std": float(v.std())}


def _corr(a: np.ndarray, b: np.ndarray) -> Optional[float]:
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or a[ok].std() == 0 or b[ok].std() == 0:
        return None
    r = float(np.corrcoef(a[ok], b[ok])[0, 1])
    return r if math.isfinite(r) else None


def class_concentration(step_dir: str | Path, config_path: str | Path | None = None) -> ConcentrationReport:
    """Loads a checkpoint's head into one process and reads phi, lambda and margins of all classes.

    Args:
        step_dir: A ``step_*`` checkpoint directory.
        config_path: The run's ``config.toml`` (default: found in or above ``step_dir``).

    Returns:
        The :class:`ConcentrationReport`.

    Raises:
        ValueError: No config found, or the checkpoint does not fit it.
    """
    from partial_fc import PartialFCConfig, PartialFCHead
    from train.checkpoint import CheckpointError, load_checkpoint, read_manifest
    from train.config import ConfigError, load_config

    from .embedders import find_run_config

    step_dir = Path(step_dir)
    cfg_path = Path(config_path) if config_path else find_run_config(step_dir)
    if cfg_path is None or not cfg_path.is_file():
        raise ValueError(f"no config.toml in or above {step_dir}; pass --config with the run's config.toml")
    try:
        cfg = load_config(cfg_path)
        if not isinstance(cfg.head, PartialFCConfig):  # a recipe without head.num_classes
            cfg = cfg.resolve(int(read_manifest(step_dir)["num_classes"]))
    except (ConfigError, CheckpointError) as e:
        raise ValueError(f"{cfg_path}: {e}") from e
    head = PartialFCHead(cfg.head, device=torch.device("cpu"))
    try:
        load_checkpoint(step_dir, head, None, restore_rng=False)
    except CheckpointError as e:
        raise ValueError(f"the head in {step_dir} does not fit {cfg_path}: {e}") from e
    phi, lam, params = head.class_margins()
    n = head.num_local_classes
    full = lambda t: np.broadcast_to(t.detach().cpu().double().numpy(), (n,)).copy()  # noqa: E731
    step = int(head.step)
    return ConcentrationReport(
        method=cfg.head.method, margin=cfg.head.preset.margin, step=step,
        uses_concentration=head.uses_concentration,
        warmup_active=head.uses_concentration and step < cfg.head.margin_warmup_steps,
        phi=full(phi), lam=full(lam), m2=full(params.m2), m3=full(params.m3),
    )


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x), dtype=np.float64)
    r[order] = np.arange(len(x))
    # Ties share their mean rank (Spearman's convention).
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=r)
    return (sums / counts)[inv]


def concentration_by_difficulty(report: ConcentrationReport, difficulty: np.ndarray) -> Optional[dict]:
    """How phi and the margin follow a known per-class difficulty (e.g. the synthetic dataset's).

    The paper's mechanism: harder identities form looser clusters (larger phi) and CG-ArcFace gives
    them larger margins. This measures both links on the classes that have a phi.

    Args:
        report: Phi and margins per class.
        difficulty: ``[C]`` difficulty of each class, in class order.

    Returns:
        ``{"spearman_phi", "spearman_m2", "terciles": [{"range", "num_classes", "phi_mean",
        "m2_mean"}]}``, or ``None`` when fewer than 3 classes have a phi.

    Raises:
        ValueError: ``difficulty`` does not have one entry per class.
    """
    d = np.asarray(difficulty, dtype=np.float64)
    if d.shape != (report.num_classes,):
        raise ValueError(f"{d.shape[0] if d.ndim else 0} difficulties for {report.num_classes} classes")
    ok = np.isfinite(report.phi) & np.isfinite(d)
    if ok.sum() < 3:
        return None
    dk, pk, mk = d[ok], report.phi[ok], report.m2[ok]
    edges = np.quantile(dk, [0.0, 1 / 3, 2 / 3, 1.0])
    terciles = []
    for i, name in enumerate(("easy", "medium", "hard")):
        sel = (dk >= edges[i]) & ((dk < edges[i + 1]) if i < 2 else (dk <= edges[i + 1]))
        terciles.append({"range": f"{name} {edges[i]:.2f}-{edges[i + 1]:.2f}", "num_classes": int(sel.sum()),
                         "phi_mean": float(pk[sel].mean()) if sel.any() else None,
                         "m2_mean": float(mk[sel].mean()) if sel.any() else None})
    return {"spearman_phi": _corr(_ranks(dk), _ranks(pk)), "spearman_m2": _corr(_ranks(dk), _ranks(mk)),
            "terciles": terciles}

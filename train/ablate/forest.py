"""``differences.png`` of a ``study-v2`` study: every variant's paired difference to the baseline
with its 95% t interval, one panel per headline metric (a forest plot).

The numbers are ``results.json``'s ``study.paired`` (see :func:`train.ablate.protocol_v2.study_report`);
matplotlib is imported only here and only when drawing.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

__all__ = ["HEADLINE", "write_forest_figure"]

#: The panels: (metric key, title).
HEADLINE: tuple[tuple[str, str], ...] = (
    ("tar_1e-4", "held-out TAR@1e-4"),
    ("tar_1e-3_vs_lookalike", "TAR@1e-3 vs look-alikes"),
    ("tar_1e-4_nuisance_hi", "TAR@1e-4 high nuisance"),
    ("nmi", "clustering NMI"),
    ("probe_top1_tail", "probe top-1, tail classes"),
    ("probe_top1_head", "probe top-1, head classes"),
)


def write_forest_figure(paired: Mapping[str, Mapping[str, Mapping[str, float]]], path: Path,
                        panels: Sequence[tuple[str, str]] = HEADLINE, baseline: str = "arcface") -> Optional[Path]:
    """Draws the paired differences (percentage points) with t intervals; ``None`` without matplotlib
    or without any variant to draw."""
    names = [v for v, row in paired.items() if any(k in row for k, _ in panels)]
    if not names:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(2.2 * len(panels) + 1.5, 0.3 * len(names) + 1.3), sharey=True)
    for ax, (key, title) in zip(axes, panels):
        for y, v in enumerate(names):
            c: Mapping[str, Any] = paired[v].get(key, {})
            m, lo, hi = (100 * float(c.get(k, math.nan)) for k in ("mean", "t_lo", "t_hi"))
            if not math.isfinite(m):
                continue
            excl = math.isfinite(lo) and math.isfinite(hi) and (lo > 0 or hi < 0)
            color = "tab:red" if excl and m < 0 else "tab:green" if excl else "0.35"
            if math.isfinite(lo) and math.isfinite(hi):
                ax.plot([lo, hi], [y, y], color=color, lw=1.4)
            ax.plot([m], [y], "o", color=color, ms=3.5)
        ax.axvline(0.0, color="0.5", lw=0.8, ls="--")
        ax.set_title(title, fontsize=8)
        ax.set_xlabel(f"- {baseline} (points)", fontsize=7)
        ax.tick_params(labelsize=7)
    axes[0].set_yticks(range(len(names)), names, fontsize=7)
    axes[0].invert_yaxis()
    fig.tight_layout()
    # tight_layout does not always leave room for long variant names: 7-point characters are
    # about 0.06 inch wide.
    label_in = 0.06 * max(len(n) for n in names) + 0.15
    fig.subplots_adjust(left=max(fig.subplotpars.left, label_in / fig.get_figwidth()))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path

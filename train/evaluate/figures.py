"""PNG figures of an evaluation (matplotlib, Agg canvas; imported only when a figure is drawn).

No pyplot: each figure is a ``matplotlib.figure.Figure`` on its own Agg canvas, so drawing here
neither needs a display nor changes the backend of a program that imports us.

- :func:`plot_score_histograms`: genuine vs impostor cosine similarity, their means and the gap
  (the view of the paper's Figure 2);
- :func:`plot_roc`: TAR against FAR on a log axis, one curve per pair set;
- :func:`plot_concentration`: the distribution of phi over classes and of the margins it yields.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Optional

import numpy as np

__all__ = ["plot_concentration", "plot_roc", "plot_score_histograms"]


def _figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("figures need matplotlib: pip install 'partial-fc[eval]'") from e
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def plot_score_histograms(scores: np.ndarray, issame: np.ndarray, path: str | Path, title: str,
                          threshold: Optional[float] = None) -> Path:
    """Histograms of genuine (same) and impostor (different) pair similarities.

    Args:
        scores: ``[P]`` cosine similarities.
        issame: ``[P]`` ground truth.
        path: Output PNG.
        title: Figure title (e.g. the pair set's name).
        threshold: Optional decision threshold to mark.

    Returns:
        The path written.
    """
    scores = np.asarray(scores, dtype=np.float64)
    issame = np.asarray(issame, dtype=bool)
    pos, neg = scores[issame], scores[~issame]
    fig = _figure(6.4, 4.0)
    ax = fig.add_subplot()
    lo, hi = min(-0.2, float(scores.min())), max(1.0, float(scores.max()))
    bins = np.linspace(lo, hi, 81)
    ax.hist(neg, bins=bins, density=True, alpha=0.55, color="tab:red", label=f"different ({len(neg)})")
    ax.hist(pos, bins=bins, density=True, alpha=0.55, color="tab:blue", label=f"same ({len(pos)})")
    ymax = ax.get_ylim()[1]
    for values, color, name in ((pos, "tab:blue", "same"), (neg, "tab:red", "different")):
        if len(values):
            m = float(values.mean())
            ax.axvline(m, color=color, linestyle="--", linewidth=1.2)
            ax.text(m, ymax * 0.95, f" {name} mean {m:.3f}", color=color, fontsize=8, va="top",
                    ha="left" if name == "same" else "right")
    if len(pos) and len(neg):
        mp, mn = float(pos.mean()), float(neg.mean())
        ax.annotate("", xy=(mp, ymax * 0.8), xytext=(mn, ymax * 0.8),
                    arrowprops={"arrowstyle": "<->", "color": "black"})
        ax.text((mp + mn) / 2, ymax * 0.82, f"gap {mp - mn:.3f}", ha="center", fontsize=9)
    if threshold is not None and math.isfinite(threshold):
        ax.axvline(threshold, color="black", linewidth=0.8, alpha=0.6, label=f"threshold {threshold:.3f}")
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(loc="center left", fontsize=8)
    return _save(fig, path)


def plot_roc(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: str | Path,
             title: str = "ROC") -> Path:
    """ROC curves, TAR against FAR on a log axis.

    Args:
        curves: ``{name: (far [T], tar [T])}`` as from :func:`train.evaluate.roc_curve`. Points with
            FAR 0 cannot sit on a log axis; each curve starts at its smallest non-zero FAR
            (``1 / #impostor pairs``).
        path: Output PNG.
        title: Figure title.

    Returns:
        The path written.
    """
    fig = _figure(6.4, 4.4)
    ax = fig.add_subplot()
    smallest = 1.0
    for name, (far, tar) in curves.items():
        far, tar = np.asarray(far, dtype=np.float64), np.asarray(tar, dtype=np.float64)
        ok = far > 0
        if not ok.any():
            continue
        smallest = min(smallest, float(far[ok].min()))
        ax.step(far[ok], tar[ok], where="post", label=name)
    ax.set_xscale("log")
    ax.set_xlim(max(smallest / 2, 1e-7), 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.set_xlabel("false accept rate (log)")
    ax.set_ylabel("true accept rate")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title)
    if curves:
        ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_concentration(phi: np.ndarray, margins: np.ndarray, path: str | Path, title: str,
                       margin_label: str = "additive angular margin m2 (rad)") -> Path:
    """Distribution of phi across classes, of the margins, and margin against phi.

    Args:
        phi: ``[C]`` concentration per class (NaN = unknown; left out and counted).
        margins: ``[C]`` margin per class.
        path: Output PNG.
        title: Figure title.
        margin_label: Axis label of the margin.

    Returns:
        The path written.
    """
    phi = np.asarray(phi, dtype=np.float64)
    margins = np.asarray(margins, dtype=np.float64)
    known = np.isfinite(phi)
    fig = _figure(12.0, 3.8)
    a, b, c = fig.subplots(1, 3)
    if known.any():
        a.hist(phi[known], bins=min(60, max(10, int(known.sum()) // 5)), color="tab:green", alpha=0.8)
        a.axvline(float(phi[known].mean()), color="black", linestyle="--", linewidth=1,
                  label=f"mean {phi[known].mean():.4f}")
        a.legend(fontsize=8)
    else:
        a.text(0.5, 0.5, "no class has a concentration estimate", ha="center", va="center",
               transform=a.transAxes)
    a.set_xlabel("concentration phi")
    a.set_ylabel("classes")
    a.set_title(f"phi over classes ({int(known.sum())} of {len(phi)} known)", fontsize=10)
    finite = np.isfinite(margins)
    span = float(margins[finite].max() - margins[finite].min()) if finite.any() else 0.0
    if finite.any():
        edges = 30 if span > 0 else [float(margins[finite][0]) - 0.01, float(margins[finite][0]) + 0.01]
        b.hist(margins[finite], bins=edges, color="tab:purple", alpha=0.8)
    b.set_xlabel(margin_label)
    b.set_ylabel("classes")
    b.set_title("margin over classes" + ("" if span > 0 else " (constant)"), fontsize=10)
    both = known & finite
    c.scatter(phi[both], margins[both], s=6, alpha=0.6, color="tab:purple")
    c.set_xlabel("concentration phi")
    c.set_ylabel(margin_label)
    c.set_title("margin against phi", fontsize=10)
    fig.suptitle(title)
    return _save(fig, path)

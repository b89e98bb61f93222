"""What a study writes: ``results.json``, ``table.md`` (mean +- std over seeds, and paired
differences to the baseline), ``study.md`` for protocol ``study-v2``, and ``ablation.png``.

* :func:`aggregate` / :func:`paired_deltas`: the numbers over seeds.
* :func:`format_table` / :func:`format_delta_table`: their Markdown tables.
* :func:`write_report`: rewrites the three text files from the runs finished so far.
* :func:`write_figure`: the bar chart (matplotlib, imported only here and only when drawing).
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from .protocol_v1 import METRICS

__all__ = ["metric_columns", "aggregate", "format_table", "paired_deltas", "format_delta_table", "write_report",
           "write_figure", "machine", "atomic_write"]


def metric_columns(protocol: str) -> tuple[tuple[str, str], ...]:
    """The table's ``(key, title)`` columns of a protocol."""
    if protocol == "study-v2":
        from .protocol_v2 import METRICS_V2

        return tuple((k, t) for k, t, _ in METRICS_V2)
    return METRICS


def aggregate(runs: Sequence[Mapping[str, Any]], metrics: Sequence[str] = tuple(k for k, _ in METRICS)
              ) -> dict[str, dict[str, dict[str, float]]]:
    """Mean and sample standard deviation (ddof = 1) of each metric per variant, over seeds.

    A metric that is NaN in any run (e.g. TAR at a FAR the pair count cannot resolve) is NaN in
    the aggregate rather than silently averaged over fewer seeds.

    Returns:
        ``{variant: {metric: {"mean", "std", "n"}}}`` in the order variants first appear; ``std``
        is NaN for a single seed.
    """
    grouped: dict[str, list[Mapping[str, Any]]] = {}
    for r in runs:
        grouped.setdefault(r["variant"], []).append(r)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for variant, rs in grouped.items():
        row = {}
        for m in metrics:
            vals = np.array([float(r["metrics"].get(m, math.nan)) for r in rs], dtype=np.float64)
            n = vals.size
            mean = float(vals.mean()) if n and np.isfinite(vals).all() else math.nan
            std = float(vals.std(ddof=1)) if n > 1 and np.isfinite(vals).all() else math.nan
            row[m] = {"mean": mean, "std": std, "n": n}
        out[variant] = row
    return out


def _percent(cell: Optional[Mapping[str, float]], signed: bool = False) -> Optional[str]:
    """``mean ± std`` of a table cell in percent, or ``None`` when there is no finite mean."""
    if cell is None or not math.isfinite(cell["mean"]):
        return None
    text = f"{100 * cell['mean']:{'+' if signed else ''}.2f}"
    if math.isfinite(cell["std"]):
        text += f" ± {100 * cell['std']:.2f}"
    return text


def format_table(agg: Mapping[str, Mapping[str, Mapping[str, float]]], baseline: Optional[str] = "arcface",
                 metrics: Sequence[tuple[str, str]] = METRICS) -> str:
    """A Markdown table of ``aggregate``'s output, values in percent (mean +- std).

    The best mean of each column is bold; a row's mean is marked ``*`` when it is below the
    baseline's mean (when a baseline row is present).
    """
    cols = [(k, t) for k, t in metrics if any(k in row for row in agg.values())]
    best = {}
    for k, _ in cols:
        means = [row[k]["mean"] for row in agg.values() if k in row and math.isfinite(row[k]["mean"])]
        best[k] = max(means) if means else math.nan
    base = agg.get(baseline) if baseline else None
    lines = ["| variant | seeds | " + " | ".join(t for _, t in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for name, row in agg.items():
        n = max((v["n"] for v in row.values()), default=0)
        cells = []
        for k, _ in cols:
            v = row.get(k)
            text = _percent(v)
            if text is None:
                cells.append("n/a")
                continue
            if v["mean"] == best[k] and len(agg) > 1:
                text = f"**{text}**"
            if base is not None and name != baseline and math.isfinite(base[k]["mean"]) and v["mean"] < base[k]["mean"]:
                text += "*"
            cells.append(text)
        lines.append(f"| `{name}` | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def paired_deltas(runs: Sequence[Mapping[str, Any]], baseline: str = "arcface",
                  metrics: Sequence[str] = tuple(k for k, _ in METRICS)) -> dict[str, dict[str, dict[str, float]]]:
    """Per-seed differences to the baseline run of the same seed, aggregated over seeds.

    Seed ``k`` of every variant sees the same images in the same order and starts from the same
    backbone, so the paired difference removes most of the seed-to-seed spread that the plain
    mean +- std of :func:`aggregate` carries.

    Returns:
        ``{variant: {metric: {"mean", "std", "n", "wins"}}}`` (variants other than the baseline
        that share at least one seed with it; ``wins`` counts seeds where the variant is higher).
    """
    base = {r["seed"]: r for r in runs if r["variant"] == baseline}
    out: dict[str, dict[str, dict[str, float]]] = {}
    for r in runs:
        if r["variant"] == baseline or r["seed"] not in base:
            continue
        row = out.setdefault(r["variant"], {m: {"d": []} for m in metrics})
        for m in metrics:
            row[m]["d"].append(float(r["metrics"].get(m, math.nan)) - float(base[r["seed"]]["metrics"].get(m, math.nan)))
    for row in out.values():
        for m, cell in row.items():
            d = np.array(cell.pop("d"), dtype=np.float64)
            ok = np.isfinite(d).all()
            cell.update(mean=float(d.mean()) if ok else math.nan,
                        std=float(d.std(ddof=1)) if ok and d.size > 1 else math.nan,
                        n=int(d.size), wins=int((d > 0).sum()) if ok else 0)
    return out


def format_delta_table(deltas: Mapping[str, Mapping[str, Mapping[str, float]]],
                       metrics: Sequence[tuple[str, str]] = METRICS) -> str:
    """Markdown table of :func:`paired_deltas`, in percentage points: ``mean ± std (wins/n)``."""
    cols = list(metrics)
    lines = ["| variant - baseline | " + " | ".join(t for _, t in cols) + " |", "|---|" + "---|" * len(cols)]
    for name, row in deltas.items():
        cells = []
        for k, _ in cols:
            c = row.get(k)
            text = _percent(c, signed=True)
            if text is None:
                cells.append("n/a")
                continue
            cells.append(f"{text} ({c['wins']}/{c['n']})")
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def atomic_write(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_report(out: Path, study: Mapping[str, Any], runs: Sequence[Mapping[str, Any]], *, protocol: str,
                 wall_s: float) -> dict[str, Any]:
    """Rewrites ``results.json``, ``table.md`` (and ``study.md`` for ``study-v2``) in ``out``.

    Args:
        study: The study's header (command, spec, machine...; see :func:`train.ablate.runner.run_study`).
        runs: The finished runs so far, in task order.
        wall_s: Seconds since the study started.

    Returns:
        The content of ``results.json``.
    """
    metric_cols = metric_columns(protocol)
    metric_keys = tuple(k for k, _ in metric_cols)
    agg = aggregate(runs, metric_keys)
    result = dict(study, runs=list(runs), aggregate=agg, wall_s=round(wall_s, 1), loadavg_end=list(os.getloadavg()),
                  finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    atomic_write(out / "results.json", json.dumps(result, indent=1, default=float))
    deltas = paired_deltas(runs, metrics=metric_keys)
    result["paired_deltas"] = deltas
    if protocol == "study-v2":
        from .protocol_v2 import study_report

        text, numbers = study_report(runs)
        from .contrasts import contrast_report

        section, numbers["contrasts"] = contrast_report(runs)
        text += ("\n" + section) if section else ""
        truth = _truth(study)
        if truth is not None:
            from .identity_effects import identity_report

            section, numbers["identity"] = identity_report(runs, truth)
            text += "\n" + section
        result["study"] = numbers
        atomic_write(out / "study.md", text)
    atomic_write(out / "results.json", json.dumps(result, indent=1, default=float))
    table = format_table(agg, metrics=metric_cols)
    if deltas:
        table += ("\nPaired differences to `arcface` (same seed), percentage points: mean ± std "
                  "(seeds where the variant is higher / seeds)\n\n" + format_delta_table(deltas, metric_cols))
    atomic_write(out / "table.md", table)
    return result


def _truth(study: Mapping[str, Any]):
    """The training identities' ground truth of the study's dataset, or ``None`` without one."""
    from .identity_effects import Truth

    meta = Path(str(study.get("data_dir", ""))) / "identities.json"
    try:
        train = json.loads(meta.read_text()).get("train", {})
        return Truth(train) if "images" in train and "family" in train else None
    except (OSError, ValueError):
        return None


def machine() -> dict[str, Any]:
    """The CPU, core count, torch threads and versions (``results.json``'s ``machine``)."""
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform()}


def write_figure(agg: Mapping[str, Mapping[str, Mapping[str, float]]], path: Path,
                 metrics: Sequence[tuple[str, str]] = METRICS) -> Optional[Path]:
    """A bar chart of every metric per variant with std error bars; ``None`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = list(agg)
    cols = [(k, t) for k, t in metrics
            if all(k in agg[n] and math.isfinite(agg[n][k]["mean"]) for n in names)]
    if not cols:
        return None
    fig, axes = plt.subplots(1, len(cols), figsize=(2.1 * len(cols), 0.28 * len(names) + 1.4), sharey=True)
    axes = np.atleast_1d(axes)
    y = np.arange(len(names))
    for ax, (k, title) in zip(axes, cols):
        means = np.array([100 * agg[n][k]["mean"] for n in names])
        stds = np.array([100 * agg[n][k]["std"] if math.isfinite(agg[n][k]["std"]) else 0.0 for n in names])
        ax.barh(y, means, xerr=stds, color=["0.55" if n == "arcface" else "tab:blue" for n in names],
                error_kw={"elinewidth": 0.8})
        if "arcface" in agg:
            ax.axvline(100 * agg["arcface"][k]["mean"], color="0.3", lw=0.8, ls="--")
        lo = max(0.0, float((means - stds).min()) - 2.0)
        ax.set_xlim(lo, min(100.0, float((means + stds).max()) + 1.0))
        ax.set_title(title, fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].set_yticks(y, names, fontsize=7)
    axes[0].invert_yaxis()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path

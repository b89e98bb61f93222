"""Controls against the variant they control (protocol ``study-v2``): ``s1:phi_shuffle=margin``
minus ``s1``, seed by seed.

``study.md``'s main tables compare every variant with the baseline. A control asks a different
question: does the method *lose* something when one thing is taken away (the assignment of the
margins, the class-size term, the online estimate)? That is the paired difference between the
control and its parent, the variant named before the first ``:`` (``s1`` for
``s1:phi_shuffle=margin``), on the seeds both have. Parents absent from the study are skipped.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from . import stats as st

__all__ = ["CONTRAST_METRICS", "parent_of", "contrasts", "contrast_report"]

#: Metrics of the contrast table: (key, title).
CONTRAST_METRICS: tuple[tuple[str, str], ...] = (
    ("tar_1e-3", "TAR@1e-3"),
    ("tar_1e-4", "TAR@1e-4"),
    ("tar_1e-3_vs_lookalike", "TAR@1e-3 vs look-alikes"),
    ("nmi", "NMI"),
    ("probe_top1", "probe top-1"),
    ("probe_top1_tail", "probe tail"),
)


def parent_of(label: str) -> str:
    """``"s1:phi_shuffle=margin"`` -> ``"s1"``; a plain preset is its own parent."""
    return label.split(":", 1)[0]


def contrasts(runs: Sequence[Mapping[str, Any]], metrics: Sequence[str] = tuple(k for k, _ in CONTRAST_METRICS)
              ) -> dict[str, dict[str, dict[str, float]]]:
    """``{control: {metric: paired_difference(control, parent)}}`` (see :func:`stats.paired_difference`)."""
    by: dict[str, dict[int, Mapping[str, Any]]] = {}
    for r in runs:
        by.setdefault(r["variant"], {})[int(r["seed"])] = r
    out: dict[str, dict[str, dict[str, float]]] = {}
    for v, seeds in by.items():
        parent = parent_of(v)
        if parent == v or parent not in by:
            continue
        common = sorted(set(seeds) & set(by[parent]))
        if not common:
            continue
        out[v] = {}
        for key in metrics:
            a = [float(seeds[k]["metrics"].get(key, math.nan)) for k in common]
            b = [float(by[parent][k]["metrics"].get(key, math.nan)) for k in common]
            out[v][key] = st.paired_difference(a, b)
    return out


def _cell(d: Mapping[str, float]) -> str:
    def p(x: float) -> str:
        return "n/a" if not math.isfinite(x) else f"{100 * x:+.2f}"

    sure = (d["t_lo"] > 0 or d["t_hi"] < 0) and (d["boot_lo"] > 0 or d["boot_hi"] < 0)
    text = f"{p(d['mean'])} [{p(d['boot_lo'])}, {p(d['boot_hi'])}]"
    return f"**{text}**" if sure else text


def contrast_report(runs: Sequence[Mapping[str, Any]]) -> tuple[str, dict[str, Any]]:
    """The ``study.md`` section "Controls against their parent" and its numbers."""
    c = contrasts(runs)
    if not c:
        return "", {}
    lines = ["## Controls against their parent", "",
             "Control minus the variant it controls (same seed), percentage points: mean [95% bootstrap CI]; "
             "bold where the t interval excludes zero too.", "",
             "| control - parent | " + " | ".join(t for _, t in CONTRAST_METRICS) + " | seeds |",
             "|---|" + "---|" * (len(CONTRAST_METRICS) + 1)]
    for v, row in c.items():
        n = next(iter(row.values()))["n"]
        lines.append(f"| `{v}` - `{parent_of(v)}` | " + " | ".join(_cell(row[k]) for k, _ in CONTRAST_METRICS)
                     + f" | {n} |")
    return "\n".join(lines) + "\n", c

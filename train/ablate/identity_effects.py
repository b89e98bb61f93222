"""Which training identities a variant helps, and what its margin follows (protocol ``study-v2``).

The paired tables of ``study.md`` compare groups (tail vs head tercile, look-alike vs distinct,
high vs low nuisance) one split at a time. Class size, nuisance and family are drawn independently
by the test bed, but a tercile split still mixes them; this module separates them per identity:

* :func:`effect_regression`: for every seed ``k``, the per-class probe top-1 difference
  ``d_c = acc_c(variant, k) - acc_c(baseline, k)`` (300 classes) is regressed by least squares on
  the standardised log class size, the standardised true nuisance and a look-alike indicator.
  The seed is the unit of replication: each coefficient is reported as its mean over seeds with a
  Student-t 95% interval (5 seeds: 4 degrees of freedom). A coefficient of +2 on "log Z" means
  the variant's gain is 2 points larger for a class one standard deviation of log-size larger,
  at equal nuisance and family.
* :func:`margin_correlations`: for the variants with a per-class margin (CG-ArcFace), the Spearman
  correlation of the final margin with log Z and with the true nuisance (overall and within
  class-size terciles). This is the direct answer to "does the margin follow cluster looseness or
  class size?": the margin is a monotone function of phi, so these are phi's correlations with the
  sign of the margin direction, except under ``phi_shuffle`` where they should vanish.

Inputs are the ``results.json`` runs (``per_class_probe_top1`` and ``margin`` lists, in class
order) and the dataset's ``identities.json`` ground truth (``train.images``, ``train.difficulty``,
``train.family``). Everything here is numpy; :func:`identity_report` returns the Markdown section
that :func:`train.ablate.report.write_report` appends to ``study.md``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from . import stats as st

__all__ = ["Truth", "effect_regression", "margin_correlations", "identity_report"]

#: Regression terms: (key, title). ``intercept`` is the gain of a distinct identity of mean
#: log-size and mean nuisance.
TERMS: tuple[tuple[str, str], ...] = (
    ("intercept", "gain at mean size & nuisance, distinct"),
    ("log_size", "per +1 SD log Z"),
    ("nuisance", "per +1 SD nuisance"),
    ("lookalike", "look-alike vs distinct"),
)


class Truth:
    """Ground truth of the training identities (``identities.json``'s ``train`` block).

    Attributes:
        size: ``[C]`` images per class (Z).
        nuisance: ``[C]`` the generator's difficulty level in [0, 1].
        lookalike: ``[C]`` bool, member of a look-alike family.
    """

    def __init__(self, train: Mapping[str, Sequence[float]]) -> None:
        self.size = np.asarray(train["images"], dtype=np.float64)
        self.nuisance = np.asarray(train["difficulty"], dtype=np.float64)
        self.lookalike = np.asarray(train["family"]) >= 0
        if not (self.size.shape == self.nuisance.shape == self.lookalike.shape):
            raise ValueError("identities.json train block: images, difficulty and family differ in length")

    def design(self) -> np.ndarray:
        """``[C, 4]`` regressors in :data:`TERMS` order (standardised log Z and nuisance)."""
        def z(x: np.ndarray) -> np.ndarray:
            sd = x.std()
            return (x - x.mean()) / sd if sd > 0 else np.zeros_like(x)

        return np.column_stack([np.ones(self.size.size), z(np.log(self.size)), z(self.nuisance),
                                self.lookalike.astype(np.float64)])


def _by_variant(runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[int, Mapping[str, Any]]]:
    by: dict[str, dict[int, Mapping[str, Any]]] = {}
    for r in runs:
        by.setdefault(r["variant"], {})[int(r["seed"])] = r
    return by


def effect_regression(runs: Sequence[Mapping[str, Any]], truth: Truth, baseline: str = "arcface"
                      ) -> dict[str, dict[str, dict[str, float]]]:
    """Per-variant regression of the per-class probe gain on size, nuisance and family.

    Returns:
        ``{variant: {term: {"mean", "t_lo", "t_hi", "n", "per_seed": [...]}}}`` in probability
        units (0.02 = 2 points); variants without per-class results are left out.
    """
    by = _by_variant(runs)
    base = by.get(baseline, {})
    x = truth.design()
    out: dict[str, dict[str, dict[str, float]]] = {}
    for v, seeds in by.items():
        if v == baseline:
            continue
        coefs = []
        for k in sorted(set(seeds) & set(base)):
            a, b = seeds[k].get("per_class_probe_top1"), base[k].get("per_class_probe_top1")
            if not a or not b or len(a) != len(b) or len(a) != x.shape[0]:
                continue
            d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
            coefs.append(np.linalg.lstsq(x, d, rcond=None)[0])
        if not coefs:
            continue
        c = np.asarray(coefs)
        row = {}
        for j, (term, _) in enumerate(TERMS):
            lo, hi = st.t_interval(c[:, j])
            row[term] = {"mean": float(c[:, j].mean()), "t_lo": lo, "t_hi": hi, "n": int(c.shape[0]),
                         "per_seed": [float(v) for v in c[:, j]]}
        out[v] = row
    return out


def margin_correlations(runs: Sequence[Mapping[str, Any]], truth: Truth) -> dict[str, dict[str, list[float]]]:
    """Spearman rho of each run's final per-class margin with log Z and with the true nuisance.

    Runs whose margins are all equal (ArcFace, Con-only variants) are left out.

    Returns:
        ``{variant: {"logz": [...], "nuisance": [...], "nuisance_within_size": [...]}}`` (one value per seed).
    """
    logz = np.log(truth.size)
    terc = st.terciles(truth.size)
    out: dict[str, dict[str, list[float]]] = {}
    for v, seeds in _by_variant(runs).items():
        for _, r in sorted(seeds.items()):
            m = r.get("margin")
            if not m or len(m) != truth.size.size:
                continue
            m = np.asarray(m, dtype=np.float64)
            if not np.isfinite(m).any() or np.nanmax(m) - np.nanmin(m) < 1e-9:
                continue
            within = [st.spearman(m[terc == t], truth.nuisance[terc == t]) for t in range(3)]
            within = [w for w in within if math.isfinite(w)]
            row = out.setdefault(v, {"logz": [], "nuisance": [], "nuisance_within_size": []})
            row["logz"].append(st.spearman(m, logz))
            row["nuisance"].append(st.spearman(m, truth.nuisance))
            row["nuisance_within_size"].append(float(np.mean(within)) if within else math.nan)
    return out


def _cell(c: Mapping[str, float]) -> str:
    def p(v: float) -> str:
        return "n/a" if v is None or not math.isfinite(v) else f"{100 * v:+.2f}"

    return f"{p(c['mean'])} ({p(c['t_lo'])}, {p(c['t_hi'])})"


def _mean_range(vals: Sequence[float]) -> str:
    v = np.asarray([x for x in vals if math.isfinite(x)])
    return "n/a" if not v.size else f"{v.mean():+.2f} [{v.min():+.2f}, {v.max():+.2f}]"


def identity_report(runs: Sequence[Mapping[str, Any]], truth: Truth, baseline: str = "arcface"
                    ) -> tuple[str, dict[str, Any]]:
    """The ``study.md`` section "Per identity" and its numbers (see the module docstring)."""
    reg = effect_regression(runs, truth, baseline)
    mc = margin_correlations(runs, truth)
    lines = ["## Per identity", ""]
    if reg:
        lines += [f"Per-class probe top-1 gain over `{baseline}` (same seed), regressed on standardised log class "
                  "size, true nuisance and a look-alike indicator; coefficients in percentage points, mean over "
                  "seeds (95% t interval over seeds).", "",
                  "| variant | " + " | ".join(t for _, t in TERMS) + " | seeds |", "|---|" + "---|" * (len(TERMS) + 1)]
        for v, row in reg.items():
            n = next(iter(row.values()))["n"]
            lines.append(f"| `{v}` | " + " | ".join(_cell(row[t]) for t, _ in TERMS) + f" | {n} |")
        lines.append("")
    if mc:
        lines += ["What the CG-ArcFace margin follows: Spearman rho of the final per-class margin, mean over seeds "
                  "[min, max].", "", "| variant | rho(margin, log Z) | rho(margin, nuisance) | "
                  "rho(margin, nuisance) within size terciles |", "|---|---|---|---|"]
        for v, row in mc.items():
            lines.append(f"| `{v}` | {_mean_range(row['logz'])} | {_mean_range(row['nuisance'])} | "
                         f"{_mean_range(row['nuisance_within_size'])} |")
        lines.append("")
    return "\n".join(lines) + "\n", {"regression": reg, "margin_rho": mc}

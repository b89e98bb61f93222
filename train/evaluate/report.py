"""Writes an evaluation's ``report.md``, ``metrics.json`` and PNG figures into one directory.

``metrics.json`` keys (all present; a part that was not run is ``null`` or empty):

- ``model``: how the embeddings were made (kind, source, backbone, embedding size, step...);
- ``flip``: whether flip-test fusion was used;
- ``verification``: one entry per ``.bin`` (accuracy, std, threshold, ``tar_at_far``,
  ``omitted_fars``, genuine/impostor means and the gap, and for the synthetic set ``by_difficulty``);
- ``templates``: IJB-style 1:1 template verification, or ``null``;
- ``ijb``: ``{"IJBB"|"IJBC": {...}}`` for ``--ijb``: ``tar_at_far_nearest`` and ``tar_at_far_at_most``
  map ``"1e-06"`` ... ``"1e-01"`` to a fraction (the two TAR@FAR rules), plus counts, the recipe's
  ``settings`` and the score statistics; empty when not run;
- ``ijbb_clustering``: ``{"subtasks": [...], "runs": [...], "config", "alignment"}`` for
  ``--ijbb-clustering``: one run per (subtask, algorithm) with NMI, pairwise and BCubed F, or ``null``;
- ``megaface``: challenge 1 for ``--megaface``: ``rank1``, ``tar_at_far`` (``"1e-06"``), the counts
  and the noise images dropped, or ``null``;
- ``clustering``: ``{"source", "num_images", "num_identities", "config", "runs": [...]}`` with one
  run per (subset, algorithm), or ``null``; ``by_difficulty`` for the synthetic set;
- ``concentration``: phi / lambda / margin statistics of a checkpoint's head, or ``null``
  (``concentration_note`` says why); with ``--synthetic`` and a checkpoint trained on that dataset,
  ``by_difficulty`` relates phi and margins to the identities' difficulty;
- ``figures``: file names of the PNGs.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .clustering import ClusteringRun
from .concentration import ConcentrationReport
from .templates import TemplateResult
from .verification import VerificationResult, roc_curve

__all__ = ["EvalResults", "PairSetEval", "write_report"]


@dataclass
class PairSetEval:
    """One ``.bin`` pair set: the figures and the raw scores behind them."""

    result: VerificationResult
    scores: np.ndarray = field(repr=False)
    issame: np.ndarray = field(repr=False)
    by_difficulty: Optional[list[dict]] = None


@dataclass
class EvalResults:
    """Everything one ``pfc eval`` produced."""

    model: dict
    flip: bool
    verification: list[PairSetEval] = field(default_factory=list)
    templates: Optional[TemplateResult] = None
    template_source: Optional[dict] = None
    ijb: dict = field(default_factory=dict)
    ijbb_clustering: Optional[dict] = None
    megaface: Optional[Any] = None
    clustering: list[ClusteringRun] = field(default_factory=list)
    clustering_info: Optional[dict] = None
    clustering_by_difficulty: Optional[list[dict]] = None
    concentration: Optional[ConcentrationReport] = None
    concentration_note: str = ""
    concentration_by_difficulty: Optional[dict] = None
    seconds: dict = field(default_factory=dict)


def _clean(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf -> None, numpy scalars -> Python, tuples -> lists."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _fmt(v: Optional[float], digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.{digits}f}"


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name) or "pairs"


def write_report(out_dir: str | Path, results: EvalResults) -> dict:
    """Writes ``metrics.json``, the figures and ``report.md`` into ``out_dir``.

    Args:
        out_dir: Output directory (created).
        results: What the evaluation produced.

    Returns:
        The ``metrics.json`` content.
    """
    from .figures import plot_concentration, plot_roc, plot_score_histograms

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures: dict[str, str] = {}
    curves = {}
    for pe in results.verification:
        name = _safe_name(pe.result.name)
        f = plot_score_histograms(pe.scores, pe.issame, out / f"hist_{name}.png", f"{pe.result.name}: pair similarities",
                                  pe.result.threshold)
        figures[f"hist_{name}"] = f.name
        far, tar, _ = roc_curve(pe.scores, pe.issame)
        curves[pe.result.name] = (far, tar)
    t = results.templates
    if t is not None:
        f = plot_score_histograms(t.pair_scores, t.issame, out / "hist_templates.png", "templates: pair similarities")
        figures["hist_templates"] = f.name
        far, tar, _ = roc_curve(t.pair_scores, t.issame)
        curves["templates (1:1)"] = (far, tar)
    for name, r in results.ijb.items():
        far, tar, _ = roc_curve(r.pair_scores, r.issame)
        keep = np.unique(np.linspace(0, len(far) - 1, min(len(far), 20000)).astype(np.int64))  # enough to draw
        curves[f"{name} (1:1)"] = (far[keep], tar[keep])
    if curves:
        figures["roc"] = plot_roc(curves, out / "roc.png").name
    c = results.concentration
    if c is not None and c.num_classes:
        title = f"{c.method} ({c.margin}) at step {c.step}"
        figures["concentration"] = plot_concentration(c.phi, c.m2, out / "concentration.png", title).name

    metrics = _clean({
        "model": results.model,
        "flip": results.flip,
        "verification": [dict(pe.result.to_dict(), **({"by_difficulty": pe.by_difficulty} if pe.by_difficulty else {}))
                         for pe in results.verification],
        "templates": None if t is None else dict(t.to_dict(), **(results.template_source or {})),
        "ijb": {name: r.to_dict() for name, r in results.ijb.items()},
        "megaface": None if results.megaface is None else results.megaface.to_dict(),
        "ijbb_clustering": None if results.ijbb_clustering is None else dict(
            results.ijbb_clustering, runs=[r.to_dict() for r in results.ijbb_clustering["runs"]]),
        "clustering": None if results.clustering_info is None else dict(
            results.clustering_info, runs=[r.to_dict() for r in results.clustering],
            **({"by_difficulty": results.clustering_by_difficulty} if results.clustering_by_difficulty else {})),
        "concentration": None if c is None else dict(
            c.to_dict(), **({"by_difficulty": results.concentration_by_difficulty}
                            if results.concentration_by_difficulty else {})),
        "concentration_note": results.concentration_note,
        "figures": figures,
        "seconds": results.seconds,
    })
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, allow_nan=False) + "\n")
    (out / "report.md").write_text(_markdown(metrics, results))
    return metrics


def _markdown(m: dict, results: EvalResults) -> str:
    md = ["# Evaluation report", ""]
    model = m["model"]
    md += [f"- model: **{model.get('kind')}** `{model.get('source')}` (backbone `{model.get('backbone')}`, "
           f"embedding size {model.get('embedding_size')}, input {model.get('image_size')}px"
           + (f", step {model['step']}" if model.get("step") is not None else "") + ")",
           f"- flip-test fusion: {'on' if m['flip'] else 'off'}",
           "- scores are cosine similarities of L2-normalised embeddings; see docs/evaluation.md for the protocols",
           ""]
    figs = m["figures"]
    if m["verification"]:
        md += ["## Verification (pair sets)", ""]
        fars = sorted({k for v in m["verification"] for k in v["tar_at_far"]}, key=float)
        md.append("| set | pairs | accuracy (10-fold) | threshold | same mean | diff. mean | gap | "
                  + " | ".join(f"TAR@{f}" for f in fars) + " |")
        md.append("|---" * (7 + len(fars)) + "|")
        for v in m["verification"]:
            md.append(f"| {v['name']} | {v['num_pairs']} | {_fmt(v['accuracy'])} ± {_fmt(v['accuracy_std'])} | "
                      f"{_fmt(v['threshold'])} | {_fmt(v.get('pos_mean'))} | {_fmt(v.get('neg_mean'))} | "
                      f"{_fmt(v.get('gap'))} | " + " | ".join(_fmt(v["tar_at_far"].get(f)) for f in fars) + " |")
        md.append("")
        for v in m["verification"]:
            if v["omitted_fars"]:
                md.append(f"- {v['name']}: TAR at FAR {', '.join(v['omitted_fars'])} omitted: "
                          f"{v.get('num_neg')} impostor pairs cannot measure a FAR below 1/{v.get('num_neg')}.")
            if v.get("by_difficulty"):
                md += ["", f"By pair difficulty ({v['name']}, synthetic identities; threshold from the 10-fold protocol):",
                       "", "| difficulty | pairs | accuracy | same mean | diff. mean | gap |", "|---|---|---|---|---|---|"]
                for b in v["by_difficulty"]:
                    md.append(f"| {b['range']} | {b['num_pairs']} | {_fmt(b['accuracy'])} | {_fmt(b['pos_mean'])} | "
                              f"{_fmt(b['neg_mean'])} | {_fmt(b['gap'])} |")
            key = "hist_" + _safe_name(v["name"])
            if key in figs:
                md += ["", f"![{v['name']} similarities]({figs[key]})"]
        md.append("")
    t = m["templates"]
    if t is not None:
        md += ["## 1:1 template verification (IJB style)", "",
               f"{t['num_templates']} templates, {t['num_pairs']} pairs ({t['num_pos']} genuine, {t['num_neg']} impostor), "
               f"media pooling {'on' if t['media_pooling'] else 'off'}.", "",
               "| " + "".join(f"TAR@FAR={f} | " for f in t["tar_at_far"]) + "same mean | diff. mean | gap |",
               "|---" * (len(t["tar_at_far"]) + 3) + "|",
               "| " + "".join(f"{_fmt(v)} | " for v in t["tar_at_far"].values())
               + f"{_fmt(t['pos_mean'])} | {_fmt(t['neg_mean'])} | {_fmt(t['gap'])} |", ""]
        if t["omitted_fars"]:
            md += [f"TAR at FAR {', '.join(t['omitted_fars'])} omitted: {t['num_neg']} impostor pairs.", ""]
        if "hist_templates" in figs:
            md += [f"![template similarities]({figs['hist_templates']})", ""]
    for name, r in m["ijb"].items():
        fars = list(r["tar_at_far_nearest"])
        md += [f"## {name} 1:1 verification", "",
               f"{r['num_images']} images, {r['num_templates']} templates, {r['num_pairs']} pairs "
               f"({r['num_pos']} genuine, {r['num_neg']} impostor); recipe {r['settings']['mode']}, alignment "
               f"{'on' if r['settings']['align'] else 'off'}, media pooling "
               f"{'on' if r['settings']['media_pooling'] else 'off'}.", "",
               "| rule | " + " | ".join(f"TAR@FAR={f}" for f in fars) + " |", "|---" * (len(fars) + 1) + "|",
               "| nearest FAR on the ROC (published tables) | "
               + " | ".join(_fmt(r["tar_at_far_nearest"][f]) for f in fars) + " |",
               "| largest TAR with FAR <= target | " + " | ".join(_fmt(r["tar_at_far_at_most"].get(f)) for f in fars)
               + " |", ""]
        if r.get("scores_file"):
            md += [f"Pair scores: `{r['scores_file']}` (pair-file order).", ""]
    if "roc" in figs:
        md += ["## ROC", "", f"![ROC]({figs['roc']})", ""]
    mf = m["megaface"]
    if mf is not None:
        md += ["## MegaFace challenge 1", "",
               f"{mf['num_probes']} FaceScrub probes of {mf['num_identities']} identities against "
               f"{mf['num_distractors']} distractors ({mf['num_trials']} rank-1 trials, {mf['num_impostor']} impostor "
               f"pairs); noise dropped: {mf['noise_dropped'] or 'none'}.", "",
               "| rank-1 identification | " + " | ".join(f"TAR@FAR={f}" for f in mf["tar_at_far"]) + " |",
               "|---" * (1 + len(mf["tar_at_far"])) + "|",
               f"| {_fmt(mf['rank1'])} | " + " | ".join(_fmt(v) for v in mf["tar_at_far"].values()) + " |", ""]
    ib = m["ijbb_clustering"]
    if ib is not None:
        md += ["## IJB-B clustering (official subtasks)", "",
               f"Faces: {ib['alignment']}; K-means and agglomerative get the subtask's subject count; agglomerative "
               f"is average linkage on a {ib['config']['knn']}-NN graph (docs/evaluation.md).", "",
               "| subtask | subjects | faces | algorithm | clusters | NMI | pairwise F (P / R) | BCubed F (P / R) | params |",
               "|---|---|---|---|---|---|---|---|---|"]
        for r in ib["runs"]:
            params = ", ".join(f"{k}={_fmt(v) if isinstance(v, float) else v}" for k, v in r["params"].items()
                               if k != "subtask")
            md.append(f"| {r['params']['subtask']} | {r['num_identities']} | {r['num_samples']} | {r['algorithm']} | "
                      f"{r['num_clusters']} | {_fmt(r['nmi'])} | {_fmt(r['pairwise_f'])} ({_fmt(r['pairwise_precision'], 3)}"
                      f" / {_fmt(r['pairwise_recall'], 3)}) | {_fmt(r['bcubed_f'])} ({_fmt(r['bcubed_precision'], 3)} / "
                      f"{_fmt(r['bcubed_recall'], 3)}) | {params} |")
        md.append("")
    cl = m["clustering"]
    if cl is not None:
        md += ["## Clustering (IJB-B clustering protocol style)", "",
               f"{cl['num_images']} images of {cl['num_identities']} identities from `{cl['source']}`; nested "
               "subsets of increasing identity count; K-means and agglomerative get the true count.", "",
               "| identities | images | algorithm | clusters | NMI | pairwise F (P / R) | BCubed F (P / R) | params |",
               "|---|---|---|---|---|---|---|---|"]
        for r in cl["runs"]:
            params = ", ".join(f"{k}={_fmt(v) if isinstance(v, float) else v}" for k, v in r["params"].items())
            if r["algorithm"] == "dbscan":
                params += f", noise {_fmt(r['noise_fraction'], 3)}"
            md.append(f"| {r['num_identities']} | {r['num_samples']} | {r['algorithm']} | {r['num_clusters']} | "
                      f"{_fmt(r['nmi'])} | {_fmt(r['pairwise_f'])} ({_fmt(r['pairwise_precision'], 3)} / "
                      f"{_fmt(r['pairwise_recall'], 3)}) | {_fmt(r['bcubed_f'])} ({_fmt(r['bcubed_precision'], 3)} / "
                      f"{_fmt(r['bcubed_recall'], 3)}) | {params} |")
        md.append("")
        if cl.get("by_difficulty"):
            md += ["BCubed F on the largest subset, by identity difficulty (synthetic identities):", "",
                   "| algorithm | difficulty | identities | images | BCubed P | BCubed R | BCubed F |",
                   "|---|---|---|---|---|---|---|"]
            for b in cl["by_difficulty"]:
                md.append(f"| {b['algorithm']} | {b['range']} | {b['num_identities']} | {b['num_samples']} | "
                          f"{_fmt(b['bcubed_precision'])} | {_fmt(b['bcubed_recall'])} | {_fmt(b['bcubed_f'])} |")
            md.append("")
    c = m["concentration"]
    md += ["## Concentration and margins", ""]
    if c is None:
        md += [results.concentration_note or "Not available for this model source.", ""]
    else:
        def row(name, s):
            if s is None:
                return f"| {name} | n/a | | | | | |"
            return (f"| {name} | {s['count']} | {_fmt(s['min'])} | {_fmt(s['p10'])} | {_fmt(s['median'])} | "
                    f"{_fmt(s['p90'])} | {_fmt(s['max'])} |")
        md += [f"Head `{c['method']}` (margin `{c['margin']}`) at step {c['step']}: {c['num_known_phi']} of "
               f"{c['num_classes']} classes have a concentration estimate."
               + (" The margin warm-up is still active: every class gets the constant margin." if c["warmup_active"] else "")
               + ("" if c["uses_concentration"] else " This margin does not depend on phi."), "",
               "| quantity | classes | min | p10 | median | p90 | max |", "|---|---|---|---|---|---|---|",
               row("phi", c["phi"]), row("lambda", c["lambda"]), row("margin m2 (rad)", c["margin_m2"]), ""]
        if c.get("corr_phi_m2") is not None:
            md += [f"Correlation of margin with phi across classes: {c['corr_phi_m2']:.3f}.", ""]
        bd = c.get("by_difficulty")
        if bd:
            md += ["By training-identity difficulty (synthetic dataset; Spearman correlation of difficulty with "
                   f"phi {_fmt(bd['spearman_phi'], 3)}, with the margin {_fmt(bd['spearman_m2'], 3)}):", "",
                   "| difficulty | classes | mean phi | mean margin m2 |", "|---|---|---|---|"]
            md += [f"| {t['range']} | {t['num_classes']} | {_fmt(t['phi_mean'])} | {_fmt(t['m2_mean'])} |"
                   for t in bd["terciles"]]
            md.append("")
        if "concentration" in figs:
            md += [f"![concentration and margins]({figs['concentration']})", ""]
    secs = m.get("seconds") or {}
    if secs:
        md += ["## Timing", "", ", ".join(f"{k} {v:.1f} s" for k, v in secs.items() if v is not None), ""]
    return "\n".join(md)

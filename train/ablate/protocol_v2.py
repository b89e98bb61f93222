"""Protocol ``study-v2`` of ``pfc ablate``: does cluster guidance help, and on which identities?

Used when a study spec sets ``protocol = "study-v2"`` (see ``train/studies/cg_study.toml`` and
docs/results.md). Next to training, every run:

* snapshots every class's phi at the end of every epoch (the bank is kept for every variant,
  ``head.track_clusters = true``, so the ArcFace baseline has a phi too) and, for variants with
  ``head.phi_refresh = "offline"``, rewrites the bank by a full pass over the training set before
  the first step and after every epoch (:func:`partial_fc.cluster.offline_refresh`);
* optionally (``curve_every_epochs``) evaluates the held-out set every few epochs: the curve that
  shows whether training has plateaued;
* after training, evaluates (:func:`evaluate_study_run`):

  - **held-out verification over all pairs** of the clustering split (identities never trained
    on; 400 x 8 images give 5.1M impostor pairs): TAR@1e-3 / 1e-4, per identity group (look-alike
    family members vs distinct identities, high vs low nuisance tercile) at the global threshold,
    the false-accept rate of look-alike impostor pairs, and TAR against look-alike impostors only;
  - **clustering** of the same embeddings (K-means, NMI, BCubed F);
  - **probe identification** of the training identities (``probe.rec``: unseen images of trained
    classes) against the classifier W, per class-size tercile (tail / head), family and nuisance;
  - **phi diagnostics**: Spearman correlation of the final phi with log Z (class size) and with
    the true nuisance level, and phi's epoch-to-epoch rank stability.

The decoded images and ground truth are :class:`train.ablate.data.StudyData`; the statistics are in
:mod:`train.ablate.stats`; :func:`study_report` writes ``study.md`` with the paired differences to
the baseline and their 95% intervals.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from . import stats as st
from .data import StudyData

PROTOCOL_V2 = "study-v2"

#: Metrics of the study-v2 tables: (key, title, higher is better).
METRICS_V2: tuple[tuple[str, str, bool], ...] = (
    ("tar_1e-3", "TAR@1e-3", True),
    ("tar_1e-4", "TAR@1e-4", True),
    ("tar_1e-4_lookalike", "TAR@1e-4 look-alike ids", True),
    ("tar_1e-4_distinct", "TAR@1e-4 distinct ids", True),
    ("tar_1e-3_vs_lookalike", "TAR@1e-3 vs look-alike impostors", True),
    ("fa_lookalike_1e-4", "look-alike FA @1e-4 thr", False),
    ("tar_1e-4_nuisance_hi", "TAR@1e-4 high nuisance", True),
    ("tar_1e-4_nuisance_lo", "TAR@1e-4 low nuisance", True),
    ("nmi", "NMI", True),
    ("bcubed_f", "BCubed F", True),
    ("probe_top1", "probe top-1", True),
    ("probe_top1_tail", "probe top-1 tail", True),
    ("probe_top1_head", "probe top-1 head", True),
    ("probe_top1_lookalike", "probe top-1 look-alike", True),
    ("probe_top1_nuisance_hi", "probe top-1 high nuisance", True),
)
#: Per-run phi diagnostics (reported as values, not differences).
PHI_METRICS: tuple[tuple[str, str], ...] = (
    ("phi_logz_rho", "rho(phi, log Z)"),
    ("phi_nuisance_rho", "rho(phi, nuisance)"),
    ("phi_nuisance_rho_partial", "rho(phi, nuisance) within size terciles"),
    ("phi_stability", "rho(phi epoch e, e+1), mean"),
    ("phi_stability_last", "rho(phi last two epochs)"),
)


def embed(model, images, batch_size: int = 256) -> np.ndarray:
    """L2-normalised ``[N, D]`` float64 embeddings in eval mode, without autograd."""
    import torch

    from ..evaluate.runner import embed_images

    device = next(model.parameters()).device
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return embed_images(model, images, device, batch_size).numpy().astype(np.float64)
    finally:
        model.train(was)


def refresh_offline(trainer, data: StudyData, batch_size: int = 256) -> dict:
    """One offline pass: embed the whole training set, rewrite the head's bank from it."""
    import torch

    from partial_fc.cluster import offline_refresh

    images, labels = data.train_images()
    feats = torch.from_numpy(embed(trainer.engine.module, images, batch_size)).float()
    lab = torch.from_numpy(labels)
    head = trainer.head
    return offline_refresh(head.bank, head.class_start, head.config.num_classes,
                           [(feats[i:i + 4096], lab[i:i + 4096]) for i in range(0, feats.shape[0], 4096)], head.ctx)


def heldout_metrics(model, data: StudyData, *, fars: Sequence[float] = (1e-3, 1e-4),
                    max_impostors: Optional[int] = None, seed: int = 0, batch_size: int = 256,
                    clustering: bool = True) -> tuple[dict[str, float], np.ndarray]:
    """All-pair verification (with group splits) and clustering on the held-out identities."""
    emb = embed(model, data.heldout_images, batch_size)
    ident = data.heldout_labels
    pairs = st.all_pair_scores(emb, ident, max_impostors=max_impostors, seed=seed)
    fam, diff = data.heldout["family"], data.heldout["difficulty"]
    terc = st.terciles(diff)
    groups = {"lookalike": fam >= 0, "distinct": fam < 0, "nuisance_hi": terc == 2, "nuisance_lo": terc == 0}
    out = st.group_verification(pairs, ident, groups, family=fam, fars=fars)
    if clustering:
        from sklearn.cluster import KMeans

        from ..evaluate.clustering import clustering_scores

        k = int(np.unique(ident).size)
        pred = KMeans(n_clusters=k, n_init=3, random_state=seed).fit_predict(emb)
        cs = clustering_scores(ident, pred)
        out.update(nmi=cs.nmi, bcubed_f=cs.bcubed_f)
    return out, emb


def probe_metrics(model, head, data: StudyData, batch_size: int = 256) -> tuple[dict[str, float], np.ndarray]:
    """Closed-set top-1 of the probe images against the classifier W, overall and per group.

    Returns:
        ``(metrics, per_class_accuracy [C])``.
    """
    if data.probe_images is None:
        return {}, np.zeros(0)
    emb = embed(model, data.probe_images, batch_size)
    w = head.weight.detach().float().cpu().numpy().astype(np.float64)
    w /= np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)
    pred = (emb @ w.T).argmax(1) + head.class_start
    hit = (pred == data.probe_labels).astype(np.float64)
    n = data.train["images"].size
    per_class = np.bincount(data.probe_labels, weights=hit, minlength=n) / np.maximum(
        np.bincount(data.probe_labels, minlength=n), 1)
    size_t, nuis_t = st.terciles(data.train["images"]), st.terciles(data.train["difficulty"])
    groups = {"": np.ones(n, bool), "_tail": size_t == 0, "_head": size_t == 2,
              "_lookalike": data.train["family"] >= 0, "_distinct": data.train["family"] < 0,
              "_nuisance_hi": nuis_t == 2, "_nuisance_lo": nuis_t == 0}
    out = {f"probe_top1{k}": float(per_class[g].mean()) if g.any() else math.nan for k, g in groups.items()}
    return out, per_class


def phi_metrics(phi_final: np.ndarray, snapshots: Sequence[np.ndarray], data: StudyData) -> dict[str, float]:
    """Does phi follow the class size or the true nuisance? Is it stable from epoch to epoch?"""
    logz = np.log(data.train["images"].astype(np.float64))
    nuis = data.train["difficulty"].astype(np.float64)
    out = {"phi_logz_rho": st.spearman(phi_final, logz), "phi_nuisance_rho": st.spearman(phi_final, nuis)}
    # Within each class-size tercile (so size cannot carry the correlation), averaged.
    t = st.terciles(data.train["images"])
    within = [st.spearman(phi_final[t == k], nuis[t == k]) for k in range(3)]
    within = [w for w in within if math.isfinite(w)]
    out["phi_nuisance_rho_partial"] = float(np.mean(within)) if within else math.nan
    stab = [s for s in st.stability([np.asarray(s) for s in snapshots]) if math.isfinite(s)]
    out["phi_stability"] = float(np.mean(stab)) if stab else math.nan
    out["phi_stability_last"] = stab[-1] if stab else math.nan
    return out


class StudyHooks:
    """The ``on_step`` callback of a study-v2 run: phi snapshots, offline refresh, the curve."""

    def __init__(self, trainer, data: StudyData, *, offline: bool, curve_every: int, fars: Sequence[float],
                 max_impostors: Optional[int], seed: int) -> None:
        self.trainer, self.data, self.offline = trainer, data, offline
        self.curve_every, self.fars, self.max_impostors, self.seed = curve_every, fars, max_impostors, seed
        self.spe = max(1, int(trainer.derived.steps_per_epoch))
        self.total = int(trainer.derived.total_steps)
        self.snapshots: list[np.ndarray] = []
        self.curve: list[dict[str, float]] = []
        self.refreshes = 0
        self._losses: list[float] = []
        if curve_every:
            # The epoch's mean training loss, read from the head's output (no trainer change).
            trainer.head.register_forward_hook(lambda m, i, o: self._losses.append(float(o["loss"].detach())))
        if offline:
            refresh_offline(trainer, data)
            self.refreshes += 1

    def __call__(self, step: int, images: int) -> None:
        end_of_epoch = step % self.spe == 0
        if not end_of_epoch and step != self.total:
            return
        head = self.trainer.head
        if head.bank is not None:
            self.snapshots.append(head.concentration().cpu().numpy().astype(np.float64).copy())
        epoch = step / self.spe
        if self.curve_every and (step == self.total or (end_of_epoch and round(epoch) % self.curve_every == 0)):
            m, _ = heldout_metrics(self.trainer.engine.module, self.data, fars=self.fars,
                                   max_impostors=self.max_impostors, seed=self.seed, clustering=False)
            p, _ = probe_metrics(self.trainer.engine.module, head, self.data)
            loss = float(np.mean(self._losses)) if self._losses else None
            self._losses.clear()
            self.curve.append({"step": step, "epoch": round(epoch, 3), **{k: m[k] for k in m if k.startswith("tar_")},
                               "fa_lookalike_1e-4": m.get("fa_lookalike_1e-4", math.nan),
                               "probe_top1": p.get("probe_top1", math.nan),
                               **({"loss": float(loss)} if loss is not None else {})})
        if self.offline and end_of_epoch and step != self.total:
            refresh_offline(self.trainer, self.data)
            self.refreshes += 1


def evaluate_study_run(trainer, data: StudyData, hooks: StudyHooks, *, seed: int, fars: Sequence[float],
                       max_impostors: Optional[int]) -> dict[str, Any]:
    """The study-v2 metrics of a trained run (see the module docstring)."""
    model, head = trainer.engine.module, trainer.head
    out, _ = heldout_metrics(model, data, fars=fars, max_impostors=max_impostors, seed=seed)
    p, per_class = probe_metrics(model, head, data)
    out.update(p)
    extra: dict[str, Any] = {"per_class_probe_top1": [round(float(v), 4) for v in per_class]}
    if head.bank is not None:
        phi = head.concentration().cpu().numpy().astype(np.float64)
        out.update(phi_metrics(phi, hooks.snapshots, data))
        extra["phi"] = [round(float(v), 6) if math.isfinite(v) else None for v in phi]
        _, _, params = head.class_margins()
        extra["margin"] = [round(float(v), 5) for v in params.m2.cpu()]
    extra["offline_refreshes"] = hooks.refreshes
    if hooks.curve:
        extra["curve"] = hooks.curve
    return {"metrics": out, **extra}


# ------------------------------------------------------------------------------------ report
def _pct(v: float, signed: bool = False) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{100 * v:{'+' if signed else ''}.2f}"


def study_report(runs: Sequence[Mapping[str, Any]], baseline: str = "arcface", n_boot: int = 10000
                 ) -> tuple[str, dict[str, Any]]:
    """``study.md`` text and its numbers: per-variant paired differences to ``baseline`` with
    95% bootstrap and t intervals, and the phi diagnostics (mean and range over seeds)."""
    by: dict[str, dict[int, Mapping[str, Any]]] = {}
    for r in runs:
        by.setdefault(r["variant"], {})[r["seed"]] = r
    base = by.get(baseline, {})
    numbers: dict[str, Any] = {"paired": {}, "phi": {}, "means": {}}
    lines = [f"Paired differences to `{baseline}` (same seed), percentage points: mean [95% bootstrap CI] "
             "(t CI; wins/losses; sign-test p). For the look-alike false-accept rate lower is better.", ""]
    for key, title, _ in METRICS_V2:
        rows = []
        for v, seeds in by.items():
            vals = [float(s["metrics"].get(key, math.nan)) for s in seeds.values()]
            numbers["means"].setdefault(v, {})[key] = float(np.mean(vals)) if vals else math.nan
            if v == baseline:
                continue
            common = sorted(set(seeds) & set(base))
            if not common:
                continue
            a = [float(seeds[k]["metrics"].get(key, math.nan)) for k in common]
            b = [float(base[k]["metrics"].get(key, math.nan)) for k in common]
            d = st.paired_difference(a, b, n_boot=n_boot)
            numbers["paired"].setdefault(v, {})[key] = d
            rows.append(f"| `{v}` | {_pct(d['mean'], True)} [{_pct(d['boot_lo'], True)}, {_pct(d['boot_hi'], True)}] "
                        f"| ({_pct(d['t_lo'], True)}, {_pct(d['t_hi'], True)}) | {d['wins']}/{d['losses']} "
                        f"| {d['sign_p']:.3f} | {d['n']} |")
        if rows:
            bm = numbers["means"].get(baseline, {}).get(key, math.nan)
            lines += [f"### {title} (`{key}`; baseline mean {_pct(bm)}%)", "",
                      "| variant | mean [bootstrap CI] | t CI | wins/losses | sign p | seeds |", "|---|---|---|---|---|---|",
                      *rows, ""]
    lines += ["### phi diagnostics per run (mean over seeds [min, max])", "",
              "| variant | " + " | ".join(t for _, t in PHI_METRICS) + " |", "|---|" + "---|" * len(PHI_METRICS)]
    for v, seeds in by.items():
        cells = []
        for key, _ in PHI_METRICS:
            vals = np.array([float(s["metrics"].get(key, math.nan)) for s in seeds.values()])
            vals = vals[np.isfinite(vals)]
            numbers["phi"].setdefault(v, {})[key] = vals.tolist()
            cells.append("n/a" if not vals.size else f"{vals.mean():+.2f} [{vals.min():+.2f}, {vals.max():+.2f}]")
        lines.append(f"| `{v}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n", numbers


def write_curve_figure(runs: Sequence[Mapping[str, Any]], path: Path) -> Optional[Path]:
    """Held-out TAR and probe top-1 against epochs for every run with a curve (PNG, small)."""
    curves = [(r["variant"], r["seed"], r.get("curve")) for r in runs if r.get("curve")]
    if not curves:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    keys = [("tar_1e-3", "held-out TAR@1e-3"), ("tar_1e-4", "held-out TAR@1e-4"), ("probe_top1", "probe top-1"),
            ("loss", "training loss")]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.0 * len(keys), 2.6))
    for ax, (k, title) in zip(axes, keys):
        for name, seed, c in curves:
            xs = [p["epoch"] for p in c if k in p]
            ys = [p[k] for p in c if k in p]
            if xs:
                ax.plot(xs, ys, marker=".", lw=1, label=f"{name} s{seed}")
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("epoch", fontsize=7)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path

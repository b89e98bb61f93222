"""``pfc ablate``: the paper's ablation study (baseline, s1..s6, center/triplet variants) on CPU.

One command generates (or reuses) a synthetic identity dataset, trains every variant for every
seed with the same recipe and budget, evaluates each trained backbone on the held-out splits and
writes ``results.json`` (every run) and ``table.md`` (mean +- std over seeds)::

    pfc ablate --out runs/ablate                          # the study of docs/results.md
    pfc ablate --out runs/ablate --variants arcface s6 --seeds 0 1
    pfc ablate --out runs/s6opts --runs-dir runs/ablate/runs --data runs/ablate/data \\
        --variants s6-options                             # a second table; reuses arcface and s6
    pfc ablate --quick --out /tmp/smoke                   # a tiny smoke run (seconds)
    pfc ablate --spec train/studies/cg_study.toml --out runs/cg_study   # issue 17's study (study-v2)

A spec file (``--spec``) holds a ``[study]`` table: :class:`StudySpec` fields (dataset, budget,
``protocol``) plus ``variants``, ``seeds``, ``jobs``, ``threads``, ``order``; command-line options
override it. ``protocol = "study-v2"`` evaluates with :mod:`train.study` (all held-out pairs,
identity groups, probe identification, phi diagnostics) and also writes ``study.md`` (paired
differences with 95% intervals, :mod:`train.study_stats`).

Variants are preset names (``arcface``, ``s1``...``s6``, ``s2_center``...), groups (``paper``,
``s6-options``, ``cg-study``) or a preset with head options, ``METHOD:key=value[:key=value...]`` (a key without
a dot is a ``head.`` key; values are TOML literals or bare strings), e.g.
``s6:margin_direction=looser_smaller:tau=0.05``.

Evaluation protocol (every run, ``PROTOCOL`` below):

- **Verification**: the generator's ``verification.bin`` (pairs of identities disjoint from
  training). k-fold accuracy and TAR at FAR 1e-3 / 1e-4 over all pairs, and over the *hard*
  pairs: the hardest third of the verification identities by the generator's ground-truth
  difficulty (``identities.json``) is "hard"; a genuine pair is hard when its identity is hard,
  an impostor pair when at least one of its two identities is (the generator's
  ``pair_difficulty`` is the max of the two). Images shared by several pairs are embedded once.
- **Clustering**: the generator's clustering split (identities disjoint from both), K-means on the
  L2-normalised embeddings with k = the true number of identities, seeded with the run's seed;
  NMI and BCubed F from :mod:`train.evaluate.clustering`.

Runs are resumable: each finished run writes ``result.json`` next to its logs with a fingerprint
of everything that decides its outcome (config without paths, dataset, protocol); a later
invocation reuses a run whose fingerprint matches and re-trains any other.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

log = logging.getLogger("train.ablate")

__all__ = [
    "Variant", "StudySpec", "PROTOCOL", "METRICS", "GROUPS", "parse_variants", "hard_identities",
    "hard_pair_mask", "aggregate", "format_table", "paired_deltas", "format_delta_table", "run_study", "main",
]

#: Version of the evaluation protocol; part of every run's fingerprint.
PROTOCOL = "ablate-v1"
#: The protocols a study spec can choose (``study-v2``: :mod:`train.study`).
PROTOCOLS = ("ablate-v1", "study-v2")

# Config keys added after the first study, dropped from a run's fingerprint while at their
# default, so the first study's finished runs stay reusable.
_LATER_DEFAULTS = {("data", "image_size"): 112, ("head", "phi_count_norm"): "log", ("head", "phi_shuffle"): "none",
                   ("head", "phi_refresh"): "online"}

#: Reported metrics, in table order: (key, column title).
METRICS: tuple[tuple[str, str], ...] = (
    ("acc", "Acc"),
    ("tar_1e-3", "TAR@1e-3"),
    ("tar_1e-4", "TAR@1e-4"),
    ("hard_acc", "Acc hard"),
    ("hard_tar_1e-3", "TAR@1e-3 hard"),
    ("hard_tar_1e-4", "TAR@1e-4 hard"),
    ("nmi", "NMI"),
    ("bcubed_f", "BCubed F"),
)

_PAPER = ("arcface", "s1", "s2", "s3", "s4", "s5", "s6", "s2_center", "s2_triplet", "s6_center", "s6_triplet")

#: Named variant groups accepted by ``--variants``.
GROUPS: dict[str, tuple[str, ...]] = {
    "paper": _PAPER,
    # The documented options of the full method (docs/method.md), one change at a time from s6.
    "s6-options": (
        "arcface",
        "s6",
        "s6:margin_direction=looser_smaller",
        "s6:temperature=fixed",
        "s6:temperature=learnable",
        "s6:con_weight=0.25:ali_weight=0.25",
        "s6:margin_warmup_steps=0",
    ),
    # Issue 17: which component helps, and does CG's margin follow looseness or class size? Each
    # control changes one thing (docs/method.md, "Study controls").
    "cg-study": (
        "arcface",
        "s1",                                   # CG-ArcFace, paper direction, PCL phi, online
        "s1:margin_direction=looser_smaller",   # the reverse direction
        "s1:phi_shuffle=margin",                # same margins, permuted across classes: no information
        "s1:phi_count_norm=none",               # phi without the class-size term
        "s1:phi_refresh=offline",               # phi from a full pass every epoch (PCL)
        "s2",                                   # Con, adaptive temperature
        "s2:phi_shuffle=temperature",           # same temperatures, permuted across classes
        "s2:temperature=fixed",                 # one temperature for all classes
        "s6",                                   # the full method
    ),
}


# ------------------------------------------------------------------------------------ variants
@dataclass(frozen=True)
class Variant:
    """One row of the table: a head preset plus config overrides.

    Attributes:
        label: The spec as given (``"s6:temperature=fixed"``); the row's name.
        method: The preset (``head.method``).
        overrides: ``section.key=value`` strings applied after the study's own settings.
    """

    label: str
    method: str
    overrides: tuple[str, ...] = ()

    @property
    def slug(self) -> str:
        """A directory-safe name of the variant."""
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", self.label.replace(":", "__")).strip("-")


def parse_variants(specs: Sequence[str]) -> list[Variant]:
    """Expands groups and parses ``METHOD[:key=value...]`` specs (duplicates are dropped).

    Raises:
        ValueError: For an unknown method or group, or a malformed option.
    """
    from partial_fc.config import PRESETS

    out: list[Variant] = []
    seen: set[str] = set()
    for spec in specs:
        for item in GROUPS.get(spec, (spec,)):
            method, *opts = item.split(":")
            if method not in PRESETS:
                raise ValueError(f"--variants: unknown method or group {method!r} in {item!r}; choose a preset "
                                 f"({', '.join(PRESETS)}) or a group ({', '.join(GROUPS)})")
            overrides = []
            for opt in opts:
                key, sep, value = opt.partition("=")
                if not sep or not key or not value:
                    raise ValueError(f"--variants: option {opt!r} of {item!r} must look like key=value "
                                     "(e.g. s6:temperature=fixed)")
                if key in ("method", "head.method"):
                    raise ValueError(f"--variants: {item!r}: set the method before the first ':' instead")
                overrides.append(f"{key if '.' in key else 'head.' + key}={value}")
            if item not in seen:
                seen.add(item)
                out.append(Variant(item, method, tuple(overrides)))
    if not out:
        raise ValueError("--variants: nothing to run")
    return out


# ------------------------------------------------------------------------------------ the study
@dataclass(frozen=True)
class StudySpec:
    """Dataset and budget of a study (everything shared by its runs).

    Attributes:
        identities, images_per_identity: Training split.
        ver_identities, ver_images_per_identity, ver_pairs: Verification split and its pairs.
        cluster_identities, cluster_images_per_identity: Clustering split.
        data_seed: Generator seed (the same for every run: seeds vary the training only).
        steps: Optimizer steps per run.
        batch_size: Images per step.
        recipe: Base recipe the study's settings and ``--set`` overrides are applied to.
        overrides: ``--set`` overrides applied to every run, after the study's settings.
        far_targets: FARs at which TAR is reported.
        image_size: Side of the generated images (and of the training input).
        family_size, family_fraction, family_share, size_distribution, images_min, images_max,
            size_exponent, probe_images_per_identity: The generator's study options
            (:class:`dali_pipelines.synth.SynthConfig`); with ``size_distribution = "powerlaw"``
            ``images_per_identity`` is unused.
        protocol: ``"ablate-v1"`` (the first study's evaluation) or ``"study-v2"`` (all held-out
            pairs, identity groups, probe identification, phi diagnostics; :mod:`train.study`).
        max_impostors: study-v2: at most this many held-out impostor pairs (a seeded sample).
        curve_every_epochs: study-v2: evaluate the held-out set every this many epochs (0 = never).
    """

    identities: int = 300
    images_per_identity: int = 24
    ver_identities: int = 150
    ver_images_per_identity: int = 10
    ver_pairs: int = 40000
    cluster_identities: int = 100
    cluster_images_per_identity: int = 20
    data_seed: int = 0
    steps: int = 80
    batch_size: int = 64
    recipe: str = "cpu_demo"
    overrides: tuple[str, ...] = ()
    far_targets: tuple[float, ...] = (1e-3, 1e-4)
    image_size: int = 112
    family_size: int = 1
    family_fraction: float = 0.5
    family_share: float = 0.8
    size_distribution: str = "fixed"
    images_min: int = 2
    images_max: int = 200
    size_exponent: float = 1.0
    probe_images_per_identity: int = 0
    protocol: str = "ablate-v1"
    max_impostors: int = 5_000_000
    curve_every_epochs: int = 0

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"ablate: protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if self.protocol == "study-v2" and (self.family_size < 2 or self.probe_images_per_identity < 1):
            raise ValueError("ablate: protocol study-v2 needs look-alike families (family_size >= 2) and probe "
                             "images (probe_images_per_identity >= 1)")
        if self.max_impostors < 1000 or self.curve_every_epochs < 0:
            raise ValueError(f"ablate: max_impostors must be >= 1000 and curve_every_epochs >= 0, got "
                             f"{self.max_impostors}, {self.curve_every_epochs}")
        for name in ("identities", "images_per_identity", "ver_identities", "ver_images_per_identity",
                     "cluster_identities", "cluster_images_per_identity"):
            if getattr(self, name) < 2:
                raise ValueError(f"ablate: {name} must be >= 2, got {getattr(self, name)}")
        if self.ver_pairs < 20 or self.ver_pairs % 2:
            raise ValueError(f"ablate: ver_pairs must be even and >= 20, got {self.ver_pairs}")
        if self.steps < 1 or self.batch_size < 2:
            raise ValueError(f"ablate: steps must be >= 1 and batch_size >= 2, got {self.steps}, {self.batch_size}")

    def synth_config(self):
        """The generator's :class:`dali_pipelines.synth.SynthConfig` of this study."""
        from dali_pipelines.synth import SynthConfig

        return SynthConfig(
            train_identities=self.identities, images_per_identity=self.images_per_identity,
            ver_identities=self.ver_identities, ver_images_per_identity=self.ver_images_per_identity,
            ver_pairs=self.ver_pairs, cluster_identities=self.cluster_identities,
            cluster_images_per_identity=self.cluster_images_per_identity, seed=self.data_seed,
            image_size=self.image_size, family_size=self.family_size, family_fraction=self.family_fraction,
            family_share=self.family_share, size_distribution=self.size_distribution, images_min=self.images_min,
            images_max=self.images_max, size_exponent=self.size_exponent,
            probe_images_per_identity=self.probe_images_per_identity,
        )

    def study_sets(self) -> list[str]:
        """The study's own overrides of the recipe (before the user's ``--set``)."""
        return [
            "data.kind=dali", "data.dali_decode=cpu", "data.dali_threads=1", f"data.batch_size={self.batch_size}",
            f"run.max_steps={self.steps}", f"run.log_every={max(1, self.steps // 5)}", "run.device=cpu",
            # One process sees every class: sampling negatives would only add noise to the ablation.
            "head.sample_rate=1.0",
            # The recipe's 100-step warm-up is sized for its 558-step run; keep the same fraction.
            f"head.margin_warmup_steps={self.steps // 5}",
            f"schedule.warmup_steps={max(1, self.steps // 10)}",
            # The study evaluates by itself after training (see evaluate_run).
            "evaluation.bin_files=[]", "evaluation.every_steps=0",
            "checkpoint.every_steps=0", "checkpoint.resume=none", "checkpoint.keep_last=1",
            "metrics.prometheus=false", "metrics.progress_bar=false", "export.onnx=false",
        ] + ([f"data.image_size={self.image_size}"] if self.image_size != 112 else []) + (
            # Every variant keeps the bank (phi of the baseline too); it does not change training.
            ["head.track_clusters=true"] if self.protocol == "study-v2" else [])


QUICK = StudySpec(identities=12, images_per_identity=6, ver_identities=9, ver_images_per_identity=4, ver_pairs=60,
                  cluster_identities=6, cluster_images_per_identity=5, steps=3, batch_size=16)


def ensure_dataset(spec: StudySpec, data_dir: Path) -> dict[str, Any]:
    """Generates the study's dataset in ``data_dir`` unless the same one is already there."""
    from dali_pipelines.synth import generate_synthetic_dataset

    sc = spec.synth_config()
    want = sc.record()
    meta = data_dir / "identities.json"
    needed = ("train.rec", "train.idx", "verification.bin", "cluster.rec", "cluster.idx")
    if meta.is_file() and all((data_dir / n).is_file() for n in needed):
        try:
            have = json.loads(meta.read_text()).get("config")
        except (OSError, ValueError):
            have = None
        if have == want:
            return {"out_dir": str(data_dir), "reused": True}
    summary = generate_synthetic_dataset(data_dir, sc, progress=False)
    summary["reused"] = False
    return summary


# ------------------------------------------------------------------------------------ evaluation
def hard_identities(difficulty: Sequence[float], fraction: float = 1.0 / 3.0) -> np.ndarray:
    """Mask of the hardest ``ceil(fraction * n)`` identities by ground-truth difficulty.

    Ties at the cut are broken by position (stable), so exactly that many are selected.

    Args:
        difficulty: ``[n]`` per-identity difficulty (higher = harder).
        fraction: Fraction of identities that count as hard, in (0, 1].

    Returns:
        ``[n]`` bool.
    """
    d = np.asarray(difficulty, dtype=np.float64)
    if d.ndim != 1 or d.size == 0:
        raise ValueError(f"difficulty must be a non-empty 1-d sequence, got shape {d.shape}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    k = int(math.ceil(fraction * d.size - 1e-9))
    order = np.argsort(-d, kind="stable")
    mask = np.zeros(d.size, dtype=bool)
    mask[order[:k]] = True
    return mask


def hard_pair_mask(pair_ids: np.ndarray, identities: Sequence[int], difficulty: Sequence[float],
                   fraction: float = 1.0 / 3.0) -> np.ndarray:
    """Which pairs involve a hard identity (see :func:`hard_identities`).

    A genuine pair (both sides the same identity) is hard when its identity is; an impostor pair
    when at least one of its identities is, matching the generator's ``pair_difficulty``
    (the max of the two).

    Args:
        pair_ids: ``[P, 2]`` identity ids of each pair's two images.
        identities: ``[n]`` the verification identity ids.
        difficulty: ``[n]`` their difficulties.

    Returns:
        ``[P]`` bool.
    """
    pair_ids = np.asarray(pair_ids, dtype=np.int64)
    if pair_ids.ndim != 2 or pair_ids.shape[1] != 2:
        raise ValueError(f"pair_ids must be [P, 2], got shape {pair_ids.shape}")
    hard = set(np.asarray(identities, dtype=np.int64)[hard_identities(difficulty, fraction)].tolist())
    known = set(np.asarray(identities, dtype=np.int64).tolist())
    unknown = set(pair_ids.ravel().tolist()) - known
    if unknown:
        raise ValueError(f"pairs reference identities without a difficulty: {sorted(unknown)[:5]}")
    return np.array([a in hard or b in hard for a, b in pair_ids.tolist()], dtype=bool)


class EvalData:
    """The decoded held-out splits of a study, shared by all its runs.

    Attributes:
        ver_images: ``[U, 3, S, S]`` uint8, the distinct images of the verification pairs.
        pair_index: ``[P, 2]`` int64 rows of ``ver_images`` of each pair.
        issame: ``[P]`` bool.
        hard: ``[P]`` bool, the hard pairs (see :func:`hard_pair_mask`).
        cluster_images: ``[M, 3, S, S]`` uint8.
        cluster_labels: ``[M]`` int64 identity of each clustering image.
    """

    def __init__(self, data_dir: Path, image_size: int = 112) -> None:
        import torch

        from dali_pipelines import FaceRecordDataset, load_verification_bin
        from dali_pipelines.decode import fit_size, get_decoder

        decode = get_decoder("auto")
        blobs, issame = load_verification_bin(data_dir / "verification.bin")
        # The generator draws every pair from a small pool of rendered images: embed each once.
        index: dict[bytes, int] = {}
        rows = np.empty(len(blobs), dtype=np.int64)
        for i, b in enumerate(blobs):
            rows[i] = index.setdefault(bytes(b), len(index))
        uniq = sorted(index, key=index.__getitem__)
        self.ver_images = torch.from_numpy(np.stack([fit_size(decode(b), image_size) for b in uniq])) \
            .permute(0, 3, 1, 2).contiguous()
        self.pair_index = rows.reshape(-1, 2)
        self.issame = np.asarray(issame, dtype=bool)
        meta = json.loads((data_dir / "identities.json").read_text())
        v = meta["verification"]
        if len(v["pairs"]) != len(self.issame):
            raise ValueError(f"{data_dir}: identities.json lists {len(v['pairs'])} pairs, verification.bin "
                             f"has {len(self.issame)}; regenerate the dataset")
        self.hard = hard_pair_mask(np.asarray(v["pairs"]), v["identities"], v["difficulty"])
        ds = FaceRecordDataset(data_dir / "cluster.rec")
        try:
            self.cluster_images = torch.from_numpy(np.stack(
                [fit_size(decode(ds.encoded_image(i)), image_size) for i in range(len(ds))]
            )).permute(0, 3, 1, 2).contiguous()
            self.cluster_labels = np.asarray(ds.labels, dtype=np.int64)
        finally:
            ds.close()


def _verification(scores: np.ndarray, issame: np.ndarray, fars: Sequence[float], prefix: str) -> dict[str, float]:
    from .evaluate.verification import tar_at_far, ten_fold_accuracy

    acc, _, _ = ten_fold_accuracy(scores, issame)
    out = {f"{prefix}acc": acc}
    for far, tar in tar_at_far(scores, issame, fars).items():
        out[f"{prefix}tar_{far:.0e}".replace("e-0", "e-")] = tar
    return out


def evaluate_run(model, data: EvalData, *, seed: int, fars: Sequence[float] = (1e-3, 1e-4),
                 batch_size: int = 256) -> dict[str, float]:
    """Verification (all and hard pairs) and clustering figures of one trained backbone.

    Args:
        model: The backbone, ``[B, 3, 112, 112] -> [B, D]``; evaluated in ``eval()`` mode.
        data: The decoded held-out splits.
        seed: K-means seed.

    Returns:
        ``{metric: value}`` with the keys of :data:`METRICS` plus pair counts and cluster counts.
    """
    from sklearn.cluster import KMeans

    from .evaluate.clustering import clustering_scores
    from .evaluate.runner import embed_images

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        ver = embed_images(model, data.ver_images, device, batch_size).numpy().astype(np.float64)
        clu = embed_images(model, data.cluster_images, device, batch_size).numpy().astype(np.float64)
    finally:
        model.train(was_training)
    a, b = data.pair_index[:, 0], data.pair_index[:, 1]
    scores = (ver[a] * ver[b]).sum(1)
    out = _verification(scores, data.issame, fars, "")
    out.update(_verification(scores[data.hard], data.issame[data.hard], fars, "hard_"))
    k = int(np.unique(data.cluster_labels).size)
    pred = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(clu)
    cs = clustering_scores(data.cluster_labels, pred)
    out.update(nmi=cs.nmi, bcubed_f=cs.bcubed_f, pairwise_f=cs.pairwise_f)
    out.update(pairs=int(len(scores)), hard_pairs=int(data.hard.sum()),
               hard_impostors=int((data.hard & ~data.issame).sum()), clusters=k)
    return out


# ------------------------------------------------------------------------------------ runs
def _fingerprint(cfg_dict: Mapping[str, Any], spec: StudySpec) -> str:
    """Hash of what decides a run's result: its config (without paths), the dataset, the protocol."""
    c = json.loads(json.dumps(cfg_dict, default=str))
    c.get("run", {}).pop("output_dir", None)
    c.get("data", {}).pop("train_rec", None)
    c.get("data", {}).get("synth", {}).pop("out_dir", None)
    for (section, key), default in _LATER_DEFAULTS.items():
        if c.get(section, {}).get(key, default) == default:
            c.get(section, {}).pop(key, None)
    payload = {"config": c, "dataset": spec.synth_config().record(), "protocol": PROTOCOL,
               "fars": list(spec.far_targets)}
    if spec.protocol != PROTOCOL:
        payload.update(protocol=spec.protocol, max_impostors=spec.max_impostors, curve=spec.curve_every_epochs)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def run_config(spec: StudySpec, variant: Variant, seed: int, runs_dir: Path, data_dir: Path):
    """The :class:`train.config.TrainConfig` of one run (recipe + study + user + variant settings)."""
    from .config import load_config

    sets = [*spec.study_sets(), *spec.overrides,
            f"data.train_rec={json.dumps(str(data_dir / 'train.rec'))}",
            f"run.output_dir={json.dumps(str(runs_dir))}", f"run.name={variant.slug}__seed{seed}",
            f"run.seed={seed}", f"head.seed={seed}", f"head.method={variant.method}", *variant.overrides]
    return load_config(spec.recipe, sets)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def finished_result(spec: StudySpec, variant: Variant, seed: int, runs_dir: Path, data_dir: Path
                    ) -> Optional[dict[str, Any]]:
    """The saved result of a run whose fingerprint matches its current config, else ``None``."""
    from .config import config_to_dict

    cfg = run_config(spec, variant, seed, runs_dir, data_dir)
    path = cfg.run_dir / "result.json"
    if not path.is_file():
        return None
    try:
        old = json.loads(path.read_text())
    except ValueError:
        return None
    if old.get("fingerprint") != _fingerprint(config_to_dict(cfg), spec):
        return None
    return dict(old, reused=True)


def train_and_evaluate(spec: StudySpec, variant: Variant, seed: int, runs_dir: Path, data_dir: Path,
                       get_data: Callable[[], EvalData]) -> dict[str, Any]:
    """One run, or its earlier result when the fingerprint matches.

    ``get_data`` returns the decoded held-out splits; it is only called when the run is trained,
    so a study whose runs are all reused decodes nothing.
    """
    from .config import config_to_dict
    from .logging_utils import teardown_logging
    from .trainer import Trainer

    done = finished_result(spec, variant, seed, runs_dir, data_dir)
    if done is not None:
        return done
    cfg = run_config(spec, variant, seed, runs_dir, data_dir)
    fp = _fingerprint(config_to_dict(cfg), spec)
    if cfg.run_dir.exists():  # unfinished, or made with other settings: start over
        shutil.rmtree(cfg.run_dir)
    data = get_data()
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    trainer = Trainer(cfg, handle_signals=False)
    extra: dict[str, Any] = {}
    try:
        if spec.protocol == "study-v2":
            from .study import StudyHooks, evaluate_study_run

            hooks = StudyHooks(trainer, data, offline=cfg.head.phi_refresh == "offline",
                               curve_every=spec.curve_every_epochs, fars=spec.far_targets,
                               max_impostors=spec.max_impostors, seed=seed)
            summary = trainer.fit(on_step=hooks)
            t1 = time.perf_counter()
            extra = evaluate_study_run(trainer, data, hooks, seed=seed, fars=spec.far_targets,
                                       max_impostors=spec.max_impostors)
            metrics = extra.pop("metrics")
            extra["steps_per_epoch"] = hooks.spe
        else:
            summary = trainer.fit()
            t1 = time.perf_counter()
            metrics = evaluate_run(trainer.engine.module, data, seed=seed, fars=spec.far_targets,
                                   batch_size=cfg.evaluation.batch_size)
    finally:
        trainer.close()
        teardown_logging()
    t2 = time.perf_counter()
    import torch

    result = {
        "variant": variant.label, "method": variant.method, "overrides": list(variant.overrides), "seed": seed,
        "fingerprint": fp, "metrics": metrics, "final_loss": summary.get("final_loss"),
        "steps": summary["step"], "skipped_steps": summary["skipped_steps"],
        "wall_s": round(t2 - t0, 2), "train_s": round(t1 - t0, 2), "eval_s": round(t2 - t1, 2),
        "torch_threads": torch.get_num_threads(), "pid": os.getpid(),
        "loadavg_1m": [round(load0, 2), round(os.getloadavg()[0], 2)], "run_dir": str(cfg.run_dir),
        **extra,
    }
    _atomic_write(cfg.run_dir / "result.json", json.dumps(result, indent=2))
    return dict(result, reused=False)


# Worker processes of `--jobs N` (spawned): each decodes the held-out splits once and keeps them.
_WORKER: dict[str, Any] = {}


def make_eval_data(spec: StudySpec, data_dir: Path):
    """The decoded held-out data the spec's protocol evaluates on."""
    if spec.protocol == "study-v2":
        from .study import StudyData

        return StudyData(data_dir, spec.image_size)
    return EvalData(data_dir, spec.image_size)


def _worker_init(threads: int, data_dir: str, spec: Optional[StudySpec] = None) -> None:
    import torch

    torch.set_num_threads(threads)
    _WORKER["data_dir"] = data_dir
    _WORKER["spec"] = spec or StudySpec()


def _worker_data():
    if "data" not in _WORKER:
        _WORKER["data"] = make_eval_data(_WORKER["spec"], Path(_WORKER["data_dir"]))
    return _WORKER["data"]


def _worker_run(spec: StudySpec, variant: Variant, seed: int, runs_dir: str, data_dir: str) -> dict[str, Any]:
    return train_and_evaluate(spec, variant, seed, Path(runs_dir), Path(data_dir), _worker_data)


# ------------------------------------------------------------------------------------ aggregation
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


def _machine() -> dict[str, Any]:
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


def run_study(spec: StudySpec, variants: Sequence[Variant], seeds: Sequence[int], out: Path, *,
              runs_dir: Optional[Path] = None, data_dir: Optional[Path] = None, figure: bool = True,
              command: str = "", jobs: int = 1, threads: Optional[int] = None,
              order: str = "seed", train: bool = True) -> dict[str, Any]:
    """Trains and evaluates every variant x seed; writes ``results.json`` and ``table.md`` in ``out``.

    By default runs go seed by seed (every variant of seed 0 first), so an interrupted study still
    has complete seeds; ``order="variant"`` finishes every seed of a variant before the next one
    (useful to get the first variants listed to all seeds first when time is short).
    ``results.json`` and ``table.md`` are rewritten after every run.

    Args:
        jobs: Runs trained at once, each in its own spawned process. On a small shared CPU two
            single-threaded processes use the cores better than one two-threaded process, whose
            threads wait for each other at every operator.
        threads: Torch threads per worker process (default: 1 with ``jobs > 1``, else torch's).
        order: ``"seed"`` or ``"variant"``: which loop is the outer one.
        train: ``False`` only collects finished runs (the others are listed as ``missing``) and
            writes the report: the tables of a study that was stopped early.

    Returns:
        The content of ``results.json``.
    """
    out.mkdir(parents=True, exist_ok=True)
    runs_dir = (runs_dir or out / "runs").resolve()
    data_dir = (data_dir or out / "data").resolve()
    t0 = time.perf_counter()
    ds = ensure_dataset(spec, data_dir)
    print(f"[ablate] dataset {data_dir} ({'reused' if ds['reused'] else 'made in %.1f s' % ds['seconds']})",
          flush=True)
    study = {
        "command": command, "spec": dataclasses.asdict(spec), "protocol": PROTOCOL, "machine": _machine(),
        "variants": [v.label for v in variants], "seeds": list(seeds), "data_dir": str(data_dir),
        "jobs": jobs, "threads_per_job": threads, "order": order, "dataset_seconds": ds.get("seconds", 0.0),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "loadavg_start": list(os.getloadavg()),
    }
    if order not in ("seed", "variant"):
        raise ValueError(f"order must be 'seed' or 'variant', got {order!r}")
    tasks = [(v, s) for s in seeds for v in variants] if order == "seed" else [(v, s) for v in variants for s in seeds]
    if spec.protocol == "study-v2":
        from .study import METRICS_V2

        metric_cols: tuple[tuple[str, str], ...] = tuple((k, t) for k, t, _ in METRICS_V2)
    else:
        metric_cols = METRICS
    metric_keys = tuple(k for k, _ in metric_cols)
    done: dict[int, dict[str, Any]] = {}
    state: dict[str, Any] = {}

    def record(i: int, r: dict[str, Any]) -> None:
        done[i] = r
        v, seed = tasks[i]
        m = r["metrics"]
        shown = ("acc", "tar_1e-3", "hard_acc", "nmi", "bcubed_f") if spec.protocol == PROTOCOL else (
            "tar_1e-3", "tar_1e-4", "fa_lookalike_1e-4", "probe_top1", "nmi", "phi_logz_rho")
        print(f"[ablate] {len(done)}/{len(tasks)} {v.label} seed {seed}: "
              + " ".join(f"{k} {m.get(k, math.nan):.4f}" for k in shown) + " "
              + ("(reused)" if r["reused"] else f"({r['wall_s']:.0f} s, load {r['loadavg_1m'][0]:.1f})"), flush=True)
        runs = [done[j] for j in sorted(done)]
        agg = aggregate(runs, metric_keys)
        state["result"] = dict(study, runs=runs, aggregate=agg, wall_s=round(time.perf_counter() - t0, 1),
                               loadavg_end=list(os.getloadavg()),
                               finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        _atomic_write(out / "results.json", json.dumps(state["result"], indent=1, default=float))
        deltas = paired_deltas(runs, metrics=metric_keys)
        state["result"]["paired_deltas"] = deltas
        if spec.protocol == "study-v2":
            from .study import study_report

            text, numbers = study_report(runs)
            state["result"]["study"] = numbers
            _atomic_write(out / "study.md", text)
        _atomic_write(out / "results.json", json.dumps(state["result"], indent=1, default=float))
        table = format_table(agg, metrics=metric_cols)
        if deltas:
            table += ("\nPaired differences to `arcface` (same seed), percentage points: mean ± std "
                      "(seeds where the variant is higher / seeds)\n\n" + format_delta_table(deltas, metric_cols))
        _atomic_write(out / "table.md", table)

    todo = []
    for i, (v, seed) in enumerate(tasks):
        r = finished_result(spec, v, seed, runs_dir, data_dir)
        if r is not None:
            record(i, r)
        else:
            todo.append(i)
    state.setdefault("result", dict(study, runs=[], aggregate={}))
    if not train:
        state["result"]["missing"] = [{"variant": tasks[i][0].label, "seed": tasks[i][1]} for i in todo]
        _atomic_write(out / "results.json", json.dumps(state["result"], indent=1, default=float))
        todo = []
    if todo and jobs <= 1:
        if threads:
            import torch

            torch.set_num_threads(threads)
        cache: list = []

        def get_data():
            if not cache:
                cache.append(make_eval_data(spec, data_dir))
            return cache[0]

        for i in todo:
            v, seed = tasks[i]
            record(i, train_and_evaluate(spec, v, seed, runs_dir, data_dir, get_data))
    elif todo:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=mp.get_context("spawn"),
                                 initializer=_worker_init, initargs=(threads or 1, str(data_dir), spec)) as pool:
            futures = {pool.submit(_worker_run, spec, tasks[i][0], tasks[i][1], str(runs_dir), str(data_dir)): i
                       for i in todo}
            for f in as_completed(futures):
                record(futures[f], f.result())
    result = state["result"]
    if figure and result["aggregate"]:
        fig = write_figure(result["aggregate"], out / "ablation.png", metric_cols)
        if fig is not None:
            result["figure"] = str(fig)
        if spec.protocol == "study-v2":
            from .study import write_curve_figure

            curve = write_curve_figure(result["runs"], out / "curves.png")
            if curve is not None:
                result["curve_figure"] = str(curve)
        _atomic_write(out / "results.json", json.dumps(result, indent=1, default=float))
    return result


# ------------------------------------------------------------------------------------ CLI
#: Keys of a spec file's ``[study]`` table that are not :class:`StudySpec` fields.
_RUN_KEYS = ("variants", "seeds", "jobs", "threads", "order")


def load_spec(path: Path) -> tuple[StudySpec, dict[str, Any]]:
    """Reads a study spec TOML: a ``[study]`` table of :class:`StudySpec` fields plus
    ``variants``, ``seeds``, ``jobs``, ``threads`` and ``order`` (see ``train/studies/``).

    Raises:
        ValueError: Unreadable file, missing table, unknown key (named with the file).
    """
    import tomllib

    try:
        doc = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"--spec {path}: {e}") from e
    table = doc.get("study")
    if not isinstance(table, dict) or set(doc) - {"study"}:
        raise ValueError(f"--spec {path}: expected exactly one [study] table, got {sorted(doc)}")
    fields = {f.name for f in dataclasses.fields(StudySpec)}
    unknown = sorted(set(table) - fields - set(_RUN_KEYS))
    if unknown:
        import difflib

        hint = difflib.get_close_matches(unknown[0], sorted(fields | set(_RUN_KEYS)), n=1)
        raise ValueError(f"--spec {path}: unknown key study.{unknown[0]}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
    run = {k: table[k] for k in _RUN_KEYS if k in table}
    kw = {k: v for k, v in table.items() if k in fields}
    for k in ("overrides", "far_targets"):
        if k in kw:
            kw[k] = tuple(kw[k])
    try:
        return StudySpec(**kw), run
    except (TypeError, ValueError) as e:
        raise ValueError(f"--spec {path}: {e}") from e


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``pfc ablate``: see the module docstring. Returns the exit code."""
    p = argparse.ArgumentParser(
        prog="pfc ablate", description="Train and evaluate the ablation variants on the synthetic dataset (CPU).")
    p.add_argument("--out", required=True, type=Path, help="output directory (results.json, table.md, runs/, data/)")
    p.add_argument("--spec", type=Path, default=None,
                   help="a study spec TOML (dataset, budget, protocol, variants, seeds, jobs; e.g. "
                        "train/studies/cg_study.toml); the options below override it")
    p.add_argument("--variants", nargs="+", default=None,
                   help="presets, groups (paper, s6-options, cg-study) or METHOD:key=value... (default: paper)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default: 0 1 2)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: %d)" % StudySpec.steps)
    p.add_argument("--batch-size", type=int, default=None, help="images per step (default: %d)" % StudySpec.batch_size)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override applied to every run (repeatable)")
    p.add_argument("--config", default=None, help="base recipe (default: %s)" % StudySpec.recipe)
    p.add_argument("--runs-dir", type=Path, default=None, help="run directories (default: OUT/runs); "
                   "point two studies at the same one to share runs")
    p.add_argument("--data", type=Path, default=None, help="dataset directory (default: OUT/data)")
    p.add_argument("--quick", action="store_true", help="a tiny dataset and 3 steps per run (smoke test)")
    p.add_argument("--no-figure", action="store_true", help="do not draw ablation.png")
    p.add_argument("--jobs", type=int, default=None, help="runs trained at once, one process each (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per job process (default 1 with --jobs > 1)")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: collect the finished runs and write results.json, table.md, the figure")
    p.add_argument("--order", choices=("seed", "variant"), default=None,
                   help="outer loop: every variant of a seed first (default), or every seed of a variant")
    args = p.parse_args(argv)
    try:
        run_opts: dict[str, Any] = {}
        if args.spec is not None:
            if args.quick:
                raise ValueError("--quick and --spec exclude each other")
            base, run_opts = load_spec(args.spec)
        else:
            base = QUICK if args.quick else StudySpec()
        variants = parse_variants(args.variants or run_opts.get("variants") or ["paper"])
        changes: dict[str, Any] = {"recipe": args.config or base.recipe,
                                   "overrides": base.overrides + tuple(args.overrides)}
        if args.steps is not None:
            changes["steps"] = args.steps
        if args.batch_size is not None:
            changes["batch_size"] = args.batch_size
        spec = dataclasses.replace(base, **changes)
        seeds = args.seeds if args.seeds is not None else run_opts.get("seeds", [0] if args.quick else [0, 1, 2])
        args.jobs = args.jobs if args.jobs is not None else int(run_opts.get("jobs", 1))
        args.threads = args.threads if args.threads is not None else run_opts.get("threads")
        args.order = args.order or run_opts.get("order", "seed")
        if len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
            raise ValueError(f"--seeds must be distinct non-negative integers, got {seeds}")
        if args.jobs < 1 or (args.threads is not None and args.threads < 1):
            raise ValueError(f"--jobs and --threads must be >= 1, got {args.jobs}, {args.threads}")
        # Fail on a bad override before any data is made or any run starts.
        for v in variants:
            run_config(spec, v, seeds[0], args.out / "runs", args.out / "data")
    except ValueError as e:  # ConfigError is a ValueError
        print(f"pfc ablate: {e}", file=sys.stderr)
        return 2
    command = "pfc ablate " + " ".join(argv if argv is not None else sys.argv[1:])
    result = run_study(spec, variants, seeds, args.out, runs_dir=args.runs_dir, data_dir=args.data,
                       figure=not args.no_figure, command=command, jobs=args.jobs, threads=args.threads,
                       order=args.order, train=not args.report_only)
    table = args.out / "table.md"
    print(table.read_text() if table.is_file() else "", end="")
    missing = result.get("missing") or []
    print(f"[ablate] {len(result['runs'])} runs in {result.get('wall_s', 0):.0f} s"
          + (f", {len(missing)} not run (--report-only)" if missing else "")
          + f"; results in {args.out / 'results.json'}", flush=True)
    return 0

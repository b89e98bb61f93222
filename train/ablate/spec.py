"""What a study is: its dataset and budget (:class:`StudySpec`), its rows (:class:`Variant`), the
named variant groups, and the spec file (``--spec``, a ``[study]`` TOML table) that holds them.

Nothing here trains or evaluates; the runner (:mod:`train.ablate.runner`) turns a spec and a variant
into a run's :class:`train.config.TrainConfig`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

__all__ = ["PROTOCOL", "PROTOCOLS", "GROUPS", "Variant", "parse_variants", "StudySpec", "QUICK", "load_spec"]

#: Version of the evaluation protocol; part of every run's fingerprint.
PROTOCOL = "ablate-v1"
#: The protocols a study spec can choose (``ablate-v1``: :mod:`train.ablate.protocol_v1`,
#: ``study-v2``: :mod:`train.ablate.protocol_v2`).
PROTOCOLS = ("ablate-v1", "study-v2")

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
        "s1:phi_count_norm=size",               # the class-size term alone: a margin from Z only
        "s1:phi_refresh=offline",               # phi from a full pass every epoch (PCL)
        "s1:phi_refresh=offline:phi_count_norm=none",  # looseness measured by a full pass, no Z
        "s2",                                   # Con, adaptive temperature
        "s2:phi_shuffle=temperature",           # same temperatures, permuted across classes
        "s2:temperature=fixed",                 # one temperature for all classes
        "s2:phi_count_norm=size",               # temperatures from the class size alone
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


def _parse_options(item: str, opts: Sequence[str]) -> list[str]:
    """``["tau=0.05", "data.x=1"]`` of ``item`` -> ``["head.tau=0.05", "data.x=1"]``."""
    overrides = []
    for opt in opts:
        key, sep, value = opt.partition("=")
        if not sep or not key or not value:
            raise ValueError(f"--variants: option {opt!r} of {item!r} must look like key=value "
                             "(e.g. s6:temperature=fixed)")
        if key in ("method", "head.method"):
            raise ValueError(f"--variants: {item!r}: set the method before the first ':' instead")
        overrides.append(f"{key if '.' in key else 'head.' + key}={value}")
    return overrides


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
            overrides = _parse_options(item, opts)
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
            (:class:`dali_pipelines.synth_faces.SynthConfig`); with ``size_distribution = "powerlaw"``
            ``images_per_identity`` is unused.
        protocol: ``"ablate-v1"`` (the first study's evaluation) or ``"study-v2"`` (all held-out
            pairs, identity groups, probe identification, phi diagnostics; :mod:`train.ablate.protocol_v2`).
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
        """The generator's :class:`dali_pipelines.synth_faces.SynthConfig` of this study."""
        from dali_pipelines.synth_faces import STUDY_OPTIONS, SynthConfig

        return SynthConfig(
            train_identities=self.identities, images_per_identity=self.images_per_identity,
            ver_identities=self.ver_identities, ver_images_per_identity=self.ver_images_per_identity,
            ver_pairs=self.ver_pairs, cluster_identities=self.cluster_identities,
            cluster_images_per_identity=self.cluster_images_per_identity, seed=self.data_seed,
            image_size=self.image_size, **{key: getattr(self, key) for key in STUDY_OPTIONS},
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
            # The study evaluates by itself after training (see train.ablate.protocol_v1.evaluate_run).
            "evaluation.bin_files=[]", "evaluation.every_steps=0",
            "checkpoint.every_steps=0", "checkpoint.resume=none", "checkpoint.keep_last=1",
            "metrics.prometheus=false", "metrics.progress_bar=false", "export.onnx=false",
        ] + ([f"data.image_size={self.image_size}"] if self.image_size != 112 else []) + (
            # Every variant keeps the bank (phi of the baseline too); it does not change training.
            ["head.track_clusters=true"] if self.protocol == "study-v2" else [])


#: The study of ``--quick``: a tiny dataset and 3 steps per run (a smoke test).
QUICK = StudySpec(identities=12, images_per_identity=6, ver_identities=9, ver_images_per_identity=4, ver_pairs=60,
                  cluster_identities=6, cluster_images_per_identity=5, steps=3, batch_size=16)


# ------------------------------------------------------------------------------------ spec files
#: Keys of a spec file's ``[study]`` table that are not :class:`StudySpec` fields.
RUN_KEYS = ("variants", "seeds", "jobs", "threads", "order")


def load_spec(path: Path) -> tuple[StudySpec, dict[str, Any]]:
    """Reads a study spec TOML: a ``[study]`` table of :class:`StudySpec` fields plus
    ``variants``, ``seeds``, ``jobs``, ``threads`` and ``order`` (see ``train/studies/``).

    Returns:
        ``(spec, run options)``: the run options are the ``RUN_KEYS`` the table sets.

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
    unknown = sorted(set(table) - fields - set(RUN_KEYS))
    if unknown:
        import difflib

        hint = difflib.get_close_matches(unknown[0], sorted(fields | set(RUN_KEYS)), n=1)
        raise ValueError(f"--spec {path}: unknown key study.{unknown[0]}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
    run = {k: table[k] for k in RUN_KEYS if k in table}
    kw = {k: v for k, v in table.items() if k in fields}
    for k in ("overrides", "far_targets"):
        if k in kw:
            kw[k] = tuple(kw[k])
    try:
        return StudySpec(**kw), run
    except (TypeError, ValueError) as e:
        raise ValueError(f"--spec {path}: {e}") from e

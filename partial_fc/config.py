"""The head's configuration: one frozen dataclass and the named method presets.

The training recipes embed :class:`PartialFCConfig` as their ``head`` section, so every option
here is settable from TOML or ``--set head.key=value``.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Optional

from .margins import GRAD_MODES

__all__ = ["PartialFCConfig", "MethodPreset", "PRESETS", "AUX_LOSSES", "TEMPERATURES"]

AUX_LOSSES = ("contrastive", "center", "triplet")
TEMPERATURES = ("adaptive", "fixed", "learnable")
EMBEDDING_GRADS = ("ddp_mean", "exact")
ROW_UPDATES = ("lazy", "dense")
DIRECTIONS = ("looser_larger", "looser_smaller")
PHI_COUNT_NORMS = ("log", "none", "size")
PHI_SHUFFLES = ("none", "margin", "temperature", "both")
PHI_REFRESHES = ("online", "offline")


@dataclass(frozen=True)
class MethodPreset:
    """What a named method switches on.

    Attributes:
        margin: Registered margin name.
        aux: ``None`` or one of ``AUX_LOSSES`` (the loss in the paper's "Con" slot).
        align: Whether the Cluster-Aligning loss is on.
    """

    margin: str
    aux: Optional[str] = None
    align: bool = False


# The paper's ablation (arXiv 2312.04029): s1..s6 combine CG-ArcFace, Con and Ali; the *_center and
# *_triplet variants replace Con with a center or triplet loss against the cluster centers.
PRESETS: dict[str, MethodPreset] = {
    "arcface": MethodPreset("arcface"),
    "cosface": MethodPreset("cosface"),
    "combined": MethodPreset("combined"),
    "s1": MethodPreset("cg_arcface"),
    "s2": MethodPreset("arcface", aux="contrastive"),
    "s3": MethodPreset("arcface", align=True),
    "s4": MethodPreset("cg_arcface", aux="contrastive"),
    "s5": MethodPreset("cg_arcface", align=True),
    "s6": MethodPreset("cg_arcface", aux="contrastive", align=True),
    "s2_center": MethodPreset("arcface", aux="center"),
    "s2_triplet": MethodPreset("arcface", aux="triplet"),
    "s6_center": MethodPreset("cg_arcface", aux="center", align=True),
    "s6_triplet": MethodPreset("cg_arcface", aux="triplet", align=True),
}

_DEFAULT_M = {"arcface": 0.5, "cosface": 0.4, "cg_arcface": 0.5, "combined": 0.5}


@dataclass(frozen=True)
class PartialFCConfig:
    """Every option of :class:`partial_fc.PartialFCHead` (see docs/method.md for the formulas).

    Attributes:
        num_classes: Number of identities (all ranks together).
        embedding_size: Embedding dimension D.
        sample_rate: Fraction of each rank's classes scored per step (positives always kept).
        con_sample_rate: Fraction of each rank's classes whose cluster centers are the Con loss's
            candidates (positives always kept), drawn per step from a generator stream of its own;
            ``None`` (default) uses the margin CE's sample. A smaller Con sample trades negatives
            for time: the Con term costs two ``N x K x D`` matmuls over its sample.
        method: A preset name from ``PRESETS``.
        margin: Override the preset's margin (a registered name), or ``None``.
        s: Logit scale.
        m: Additive margin (ArcFace angle / CosFace cosine); also the CG warm-up margin.
            ``None`` takes the margin's default (0.5 ArcFace and CG, 0.4 CosFace).
        m1, m2, m3: The combined margin ``cos(m1*theta + m2) - m3``.
        m_min, m_max: CG-ArcFace margin range.
        margin_direction: ``"looser_larger"`` (larger phi -> larger margin) or ``"looser_smaller"``.
        margin_grad: ``"exact"`` or ``"straight_through"``.
        margin_warmup_steps: Steps during which CG-ArcFace uses the constant margin ``m``.
        margin_warmup_unseen: Classes without a concentration estimate use ``m`` (else they are
            treated as the loosest class).
        phi_percentiles: Percentile range phi is clipped to before normalising (global).
        phi_bins: Histogram bins for the global percentiles.
        bank_momentum: m_c of the Cluster-Center Bank.
        phi_momentum: Momentum of the running mean distance behind phi.
        phi_alpha: PCL smoothing constant alpha.
        phi_count_norm: ``"log"`` (PCL: phi = mean distance / log(Z + alpha)), ``"none"``
            (phi = mean distance; the class size Z plays no part) or ``"size"`` (phi = 1 / log(Z +
            alpha): the class size alone, no distance; a control).
        phi_shuffle: A control that keeps the distribution of phi and removes its information:
            ``"margin"`` gives CG-ArcFace's margin of class y the phi of class ``perm[y]`` (a
            fixed random permutation of all classes drawn from ``seed``), ``"temperature"`` does
            the same for the adaptive Con temperature, ``"both"`` for both; ``"none"`` (default)
            is the method. Costs one all-gather of every class's phi per step.
        phi_refresh: ``"online"`` (default: the bank follows every batch) or ``"offline"`` (the
            bank is left alone by the step and rewritten by a full pass over the training set,
            :func:`partial_fc.cluster.offline_refresh`, which the caller runs -- ``pfc ablate``
            does, every epoch; ``pfc train`` does not).
        track_clusters: Keep the bank even when the method does not need it (for statistics);
            ``None`` keeps it exactly when the method needs it.
        con_weight: Weight of the contrastive-slot loss (Con, center or triplet).
        ali_weight: Weight of the Cluster-Aligning loss.
        temperature: ``"adaptive"`` (tau_j = tau * phi_j / mean phi), ``"fixed"`` or ``"learnable"``.
        tau: Base temperature tau_0.
        tau_ratio_range: Bounds of tau_j / tau_0 for the adaptive temperature, so a degenerate
            class (phi near 0, e.g. duplicated images) cannot drive its temperature to zero.
        triplet_margin: Cosine margin of the triplet variant.
        embedding_grad: ``"ddp_mean"`` (embedding gradient scaled by world size to cancel the
            data-parallel average) or ``"exact"`` (gradient of the global mean loss).
        init_std: Standard deviation of the normal initialisation of W.
        seed: Seed of W's initialisation and of the class sampler.
        validate_inputs: Check labels, finiteness and batch sizes every step (one host sync).
        row_update: How W's shard gets its gradient when ``sample_rate < 1``. ``"lazy"``
            (default): a row-sparse gradient holding only the sampled rows, for the row optimizers
            of :mod:`partial_fc.optim` -- unsampled rows keep their momentum frozen and get no
            weight decay (the Partial FC convention), and no ``[C, D]`` gradient is ever built.
            ``"dense"``: a dense ``[C, D]`` gradient (zero on unsampled rows) for a plain torch
            optimizer, whose momentum keeps moving and whose weight decay shrinks every row
            every step.
    """

    num_classes: int
    embedding_size: int = 512
    sample_rate: float = 1.0
    con_sample_rate: Optional[float] = None
    method: str = "arcface"
    margin: Optional[str] = None
    s: float = 64.0
    m: Optional[float] = None
    m1: float = 1.0
    m2: float = 0.5
    m3: float = 0.0
    m_min: float = 0.4
    m_max: float = 0.6
    margin_direction: str = "looser_larger"
    margin_grad: str = "exact"
    margin_warmup_steps: int = 0
    margin_warmup_unseen: bool = True
    phi_percentiles: tuple[float, float] = (10.0, 90.0)
    phi_bins: int = 4096
    bank_momentum: float = 0.9
    phi_momentum: float = 0.9
    phi_alpha: float = 10.0
    phi_count_norm: str = "log"
    phi_shuffle: str = "none"
    phi_refresh: str = "online"
    track_clusters: Optional[bool] = None
    con_weight: float = 1.0
    ali_weight: float = 1.0
    temperature: str = "adaptive"
    tau: float = 0.1
    tau_ratio_range: tuple[float, float] = (0.25, 4.0)
    triplet_margin: float = 0.2
    embedding_grad: str = "ddp_mean"
    init_std: float = 0.01
    seed: int = 0
    validate_inputs: bool = True
    row_update: str = "lazy"

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise ValueError(f"head config: {msg}")

        if self.method not in PRESETS:
            hint = difflib.get_close_matches(self.method, list(PRESETS), n=1)
            bad(f"unknown method {self.method!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                + f"; choose one of {sorted(PRESETS)}")
        if self.num_classes < 1 or self.embedding_size < 1:
            bad("num_classes and embedding_size must be positive")
        if not 0.0 < self.sample_rate <= 1.0:
            bad(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.con_sample_rate is not None and not 0.0 < self.con_sample_rate <= 1.0:
            bad(f"con_sample_rate must be in (0, 1] (or None for the margin CE's sample), got {self.con_sample_rate}")
        if self.s <= 0:
            bad(f"scale s must be positive, got {self.s}")
        if self.m_min > self.m_max:
            bad(f"m_min ({self.m_min}) must not exceed m_max ({self.m_max})")
        if self.margin_direction not in DIRECTIONS:
            bad(f"margin_direction must be one of {DIRECTIONS}, got {self.margin_direction!r}")
        if self.margin_grad not in GRAD_MODES:
            bad(f"margin_grad must be one of {GRAD_MODES}, got {self.margin_grad!r}")
        if self.phi_count_norm not in PHI_COUNT_NORMS:
            bad(f"phi_count_norm must be one of {PHI_COUNT_NORMS}, got {self.phi_count_norm!r}")
        if self.phi_shuffle not in PHI_SHUFFLES:
            bad(f"phi_shuffle must be one of {PHI_SHUFFLES}, got {self.phi_shuffle!r}")
        if self.phi_refresh not in PHI_REFRESHES:
            bad(f"phi_refresh must be one of {PHI_REFRESHES}, got {self.phi_refresh!r}")
        if self.temperature not in TEMPERATURES:
            bad(f"temperature must be one of {TEMPERATURES}, got {self.temperature!r}")
        if self.embedding_grad not in EMBEDDING_GRADS:
            bad(f"embedding_grad must be one of {EMBEDDING_GRADS}, got {self.embedding_grad!r}")
        if self.row_update not in ROW_UPDATES:
            bad(f"row_update must be one of {ROW_UPDATES}, got {self.row_update!r}")
        if self.tau <= 0:
            bad(f"tau must be positive, got {self.tau}")
        if not 0.0 < self.tau_ratio_range[0] <= 1.0 <= self.tau_ratio_range[1]:
            bad(f"tau_ratio_range must satisfy 0 < low <= 1 <= high, got {self.tau_ratio_range}")
        lo, hi = self.phi_percentiles
        if not 0.0 <= lo <= hi <= 100.0:
            bad(f"phi_percentiles must satisfy 0 <= low <= high <= 100, got {self.phi_percentiles}")
        if not 0.0 <= self.bank_momentum < 1.0 or not 0.0 <= self.phi_momentum < 1.0:
            bad("bank_momentum and phi_momentum must be in [0, 1)")
        if self.phi_bins < 2:
            bad("phi_bins must be at least 2")
        if self.margin_warmup_steps < 0:
            bad("margin_warmup_steps must be >= 0")

    @property
    def preset(self) -> MethodPreset:
        """The preset of ``method``, with ``margin`` overridden when set."""
        p = PRESETS[self.method]
        return dataclasses.replace(p, margin=self.margin) if self.margin else p

    @property
    def margin_m(self) -> float:
        """The constant margin m (explicit, or the margin's default)."""
        return self.m if self.m is not None else _DEFAULT_M.get(self.preset.margin, 0.5)

    @property
    def needs_bank(self) -> bool:
        """Whether the Cluster-Center Bank is kept."""
        p = self.preset
        needed = p.margin == "cg_arcface" or p.aux is not None or p.align
        return needed if self.track_clusters is None else (self.track_clusters or needed)

    @classmethod
    def from_kwargs(cls, base: Optional["PartialFCConfig"] = None, **kwargs) -> "PartialFCConfig":
        """Builds a config from keyword options (on top of ``base``), rejecting unknown names.

        Raises:
            TypeError: For an unknown option, with the closest known name.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        for key in kwargs:
            if key not in names:
                hint = difflib.get_close_matches(key, sorted(names), n=1)
                raise TypeError(
                    f"unknown head option {key!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                )
        for key in ("phi_percentiles", "tau_ratio_range"):
            if key in kwargs:
                kwargs[key] = tuple(float(x) for x in kwargs[key])
        if base is not None:
            return dataclasses.replace(base, **kwargs)
        return cls(**kwargs)


"""The model's sections: ``[backbone]``, ``[model]`` (weights to start from) and ``[head]``.

``[head]`` holds the options of :class:`partial_fc.config.PartialFCConfig`. A recipe may leave
``head.num_classes`` out (or set it to 0): the head is then a :class:`HeadSection` (the recipe's
table, ``num_classes = None``) until the dataset is opened and :meth:`TrainConfig.resolve` turns it
into the ``PartialFCConfig`` the head is built from, by :func:`head_config`. A recipe that states
the count gives a ``PartialFCConfig`` at once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

from partial_fc.config import PartialFCConfig

from .checking import ConfigError, _check, _Section


@dataclass(frozen=True)
class BackboneConfig(_Section):
    """The ``[backbone]`` section: the data-parallel embedding network.

    Attributes:
        name: Name in the `partial_fc.backbones` registry; stored as given and looked up when the
            model is built.
        num_features: Embedding size; must equal `head.embedding_size`.
        dropout: Dropout before the embedding layer, in [0, 1).
        channels_last: Channels-last memory format.
        compile: `torch.compile` the backbone.
    """

    _SECTION = "backbone"

    name: str = "r50"
    num_features: int = 512
    dropout: float = 0.0
    channels_last: bool = False
    compile: bool = False

    def _validate(self) -> None:
        if not self.name:
            self._fail("name", "must not be empty")
        self._min("num_features", 1)
        if not 0.0 <= self.dropout < 1.0:
            self._fail("dropout", f"must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class ModelConfig(_Section):
    """The ``[model]`` section: where the backbone's weights start.

    Attributes:
        init_from: Pretrained backbone weights to fine-tune from: a checkpoint directory, a
            checkpoint root or run directory (its newest complete checkpoint), or an exported
            `backbone.pt`. Weights only: the head, both optimizers and the schedule start fresh. A
            run with a checkpoint of its own resumes from that instead (`resume = "auto"`); an
            explicit `checkpoint.resume` path together with `init_from` is an error. See
            [training.md](training.md#fine-tuning-and-model-selection).
    """

    _SECTION = "model"

    init_from: str = ""


@dataclass(frozen=True)
class HeadSection(_Section):
    """The ``[head]`` section while ``num_classes`` is still to come from the dataset.

    The keys of ``partial_fc.config.PartialFCConfig``, with the same defaults
    (tests/unit/test_config.py checks that they stay the same) and its own validation;
    ``num_classes`` may be left out (see "The head and ``num_classes``" above). A recipe without it
    gives a ``HeadSection`` (``num_classes = None``); ``TrainConfig.resolve`` turns it into a
    ``PartialFCConfig`` with :func:`head_config` once the dataset is open.

    Attributes:
        num_classes: Number of identities (all ranks together).
        embedding_size: Embedding dimension; must equal `backbone.num_features`.
        sample_rate: Fraction of each rank's classes scored per step (positives always kept), in (0,
            1].
        con_sample_rate: Fraction of each rank's classes whose cluster centers are the Con loss's
            candidates (positives always kept), in (0, 1], drawn per step from its own seeded
            stream. Smaller = fewer negatives, less Con time (its two `N x K x D` matmuls); quality
            effect not measured at scale. See
            [method.md](method.md#5-supervised-cluster-contrastive-loss-con-paper-the-temperature-scaling-is-pcls).
        method: A preset: `arcface`, `cosface`, `combined`, `s1`..`s6`, `s2_center`, `s2_triplet`,
            `s6_center`, `s6_triplet`. Recipes use `s6`.
        margin: Override the preset's margin.
        s: Logit scale.
        m: Constant margin (0.5 ArcFace/CG, 0.4 CosFace); also CG-ArcFace's warm-up margin.
        m1: Combined margin `cos(m1*theta + m2) - m3`.
        m2: Combined margin `cos(m1*theta + m2) - m3`.
        m3: Combined margin `cos(m1*theta + m2) - m3`.
        m_min: CG-ArcFace margin range.
        m_max: CG-ArcFace margin range.
        margin_direction: or `"looser_smaller"`.
        margin_grad: or `"straight_through"`.
        margin_warmup_steps: Head forward passes with the constant margin before CG-ArcFace takes
            over.
        margin_warmup_unseen: Classes without a concentration estimate use `m`.
        phi_percentiles: Percentile range phi is clipped to.
        phi_bins: Histogram bins of the global percentiles.
        bank_momentum: Momentum of the cluster-center bank.
        phi_momentum: Momentum of the running mean distance.
        phi_alpha: Concentration smoothing constant.
        phi_count_norm: `"log"`: phi = mean distance / log(Z + alpha) (PCL); `"none"`: phi = mean
            distance (no class-size term); `"size"`: phi = 1 / log(Z + alpha) (class size alone,
            no distance). Study controls; see [method.md](method.md#10-study-controls-ours).
        phi_shuffle: Control: `"margin"`, `"temperature"` or `"both"` give each class the phi of
            another class (a fixed permutation from `head.seed`): same distribution, no information.
            One all-gather of every class's phi per step.
        phi_refresh: `"offline"`: the step leaves the bank alone; the caller rewrites it by a full
            pass over the training set (`partial_fc.cluster.offline_refresh`). `pfc ablate` does
            this before the first step and after every epoch; `pfc train` refuses it (exit 2):
            the study found the online estimate better ([results.md](results.md)).
        track_clusters: Keep the bank even when the method does not need it.
        con_weight: Weight of the contrastive-slot loss.
        ali_weight: Weight of the cluster-aligning loss.
        temperature: `adaptive`, `fixed` or `learnable`.
        tau: Base temperature.
        tau_ratio_range: Bounds of the adaptive temperature ratio.
        triplet_margin: Margin of the triplet variant.
        embedding_grad: or `"exact"`.
        init_std: Std of the class-center initialisation.
        seed: Seed of the class centers and the class sampler.
        validate_inputs: Check labels and finiteness every step.
        row_update: `lazy`: W's shard gets a row-sparse gradient of the sampled rows only and the
            head optimizer (SparseRowSGD / SparseRowAdamW) updates only those rows; unsampled rows
            keep their momentum frozen and get no weight decay. `dense`: a dense `[C, D]` gradient
            and a plain torch optimizer over the whole shard (momentum keeps moving unsampled rows,
            weight decay shrinks every row every step). See docs/performance.md.
    """

    _SECTION = "head"

    num_classes: Optional[int] = None
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

    def _validate(self) -> None:
        if self.num_classes is not None:
            self._fail("num_classes", "is set; a HeadSection stands for a head whose class count is still to come "
                                      "(use head_config(section, num_classes))")
        head_config(self, 1)  # PartialFCConfig validates every option; 1 is a stand-in class count


def _head_error(exc: Exception) -> ConfigError:
    msg = str(exc)
    return ConfigError(msg if msg.startswith("head") else f"head: {msg}")


def head_config(section: HeadSection, num_classes: int) -> PartialFCConfig:
    """The ``PartialFCConfig`` of a head section, with ``num_classes`` filled in.

    Raises:
        ConfigError: If an option is invalid (PartialFCConfig's own message).
    """
    options = {f.name: getattr(section, f.name) for f in dataclasses.fields(section) if f.name != "num_classes"}
    try:
        return PartialFCConfig(num_classes=num_classes, **options)
    except (TypeError, ValueError) as exc:
        raise _head_error(exc) from exc


def build_head(data: Mapping[str, Any]) -> Union[PartialFCConfig, HeadSection]:
    """The ``[head]`` section from its TOML table (keys already checked).

    A ``PartialFCConfig`` when the table states ``num_classes``, else a :class:`HeadSection`.
    """
    options = dict(data)
    num_classes = _check(options.pop("num_classes", None), Optional[int], "head.num_classes")
    section = HeadSection(**options)  # type-checks and validates every other option
    if num_classes is None or num_classes == 0:
        return section
    return head_config(section, num_classes)

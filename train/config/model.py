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

from .checking import ConfigError, _check, _hints, _Section

@dataclass(frozen=True)
class BackboneConfig(_Section):
    """The ``[backbone]`` section: the data-parallel embedding network.

    Attributes:
        name: Registry name in ``partial_fc.backbones`` (e.g. ``"r50"``, ``"vit_b"``); it is
            stored as given and looked up when the model is built.
        num_features: Embedding size; must equal ``head.embedding_size``.
        dropout: Dropout before the embedding layer, in [0, 1).
        channels_last: Use the channels-last memory format (faster convolutions on GPU).
        compile: Wrap the backbone in ``torch.compile``.
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
        init_from: ``""`` (random initialisation) or a path to pretrained backbone weights for
            fine-tuning: a checkpoint directory, a checkpoint root or a run directory (its newest
            complete checkpoint), or an exported ``backbone.pt``. Only the backbone's weights are
            loaded; the head, both optimizers and the schedule start fresh. A run that has a
            checkpoint of its own resumes from it instead (``checkpoint.resume = "auto"``), so a
            requeued fine-tuning job continues where it stopped.
    """

    _SECTION = "model"

    init_from: str = ""


@dataclass(frozen=True)
class HeadSection(_Section):
    """The ``[head]`` section while ``num_classes`` is still to come from the dataset.

    The fields are those of :class:`PartialFCConfig`, with the same defaults
    (tests/unit/test_config.py checks that they stay the same); ``num_classes`` is ``None``.
    Construction checks every option with PartialFCConfig's own validation.
    :func:`head_config` gives the ``PartialFCConfig`` once the class count is known.

    Attributes:
HEAD_ATTRIBUTES
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
    hints = _hints(HeadSection)
    opts = {k: _check(v, hints[k], f"head.{k}") for k, v in data.items()}
    num_classes = opts.pop("num_classes", None)
    try:
        section = HeadSection(**opts)
    except TypeError as exc:  # an unknown option (the loader checks keys; direct callers may not)
        raise _head_error(exc) from exc
    if num_classes is None or num_classes == 0:
        return section
    return head_config(section, num_classes)

"""partial_fc: the model-parallel core (sharding, collectives, margins, losses, cluster bank, head).

Importing this package has no side effects: no process group is created and no device is touched.
"""

from .cluster import ClusterBank, ConcentrationStats, concentration_stats, normalized_concentration
from .config import PRESETS, PartialFCConfig
from .distributed import ParallelContext
from .head import PartialFCHead, init_class_centers
from .margins import apply_margin, build_margin, cluster_guided_margin, list_margins, register_margin
from .sharding import ClassPartition, sample_classes

__all__ = [
    "ClassPartition",
    "ClusterBank",
    "ConcentrationStats",
    "PRESETS",
    "ParallelContext",
    "PartialFCConfig",
    "PartialFCHead",
    "apply_margin",
    "build_margin",
    "cluster_guided_margin",
    "concentration_stats",
    "init_class_centers",
    "list_margins",
    "normalized_concentration",
    "register_margin",
    "sample_classes",
]

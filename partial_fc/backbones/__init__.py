"""Face-recognition backbones: ``[B, 3, 112, 112]`` images -> ``[B, num_features]`` embeddings.

Importing this package registers every backbone; build them by name::

    from partial_fc.backbones import build_backbone, list_backbones
    model = build_backbone("r50", num_features=512)
"""

from .registry import build_backbone, list_backbones, register_backbone

# Imported for their registration side effect.
from . import iresnet, mobilefacenet, vit  # noqa: E402,F401  isort: skip

__all__ = ["build_backbone", "list_backbones", "register_backbone"]

"""Data layer of partial-fc: RecordIO face datasets and training loaders.

Public entry points:

* ``build_train_loader`` - one output contract for DALI, PyTorch and synthetic loaders.
* ``FaceRecordDataset`` / ``RecordReader`` / ``RecordWriter`` / ``InsightFaceWriter``.
* ``load_verification_bin`` / ``write_verification_bin`` - safe LFW-style ``.bin`` I/O.
* ``generate_synthetic_dataset`` and ``pack_folder`` - the ``synth`` and ``pack`` commands.

Importing this package has no side effects and does not import DALI.
"""

from __future__ import annotations

from .base import CorruptImageError, TrainLoader
from .dataset import FaceRecordDataset, InsightFaceWriter
from .loaders import build_train_loader
from .pack import PackError, PackSummary, VerifyReport, pack_folder, verify_dataset
from .recordio import (
    IRHeader,
    RecordIOError,
    RecordReader,
    RecordWriter,
    pack_image_record,
    unpack_image_record,
)
from .synth_faces import SynthConfig, generate_synthetic_dataset
from .verification_bin import (
    UnsafePickleError,
    load_verification_bin,
    write_verification_bin,
)

__all__ = [
    "CorruptImageError",
    "FaceRecordDataset",
    "IRHeader",
    "PackError",
    "PackSummary",
    "VerifyReport",
    "InsightFaceWriter",
    "RecordIOError",
    "RecordReader",
    "RecordWriter",
    "SynthConfig",
    "TrainLoader",
    "UnsafePickleError",
    "build_train_loader",
    "generate_synthetic_dataset",
    "load_verification_bin",
    "pack_folder",
    "pack_image_record",
    "unpack_image_record",
    "verify_dataset",
    "write_verification_bin",
]

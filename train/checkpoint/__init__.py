"""Checkpoints of a Partial FC job: one logical checkpoint per save, loadable on any world size.

A checkpoint is a directory ``<root>/step_000001234/`` (see docs/checkpoints.md)::

    manifest.json                                   written LAST by rank 0: the commit record
    backbone.pt                                     backbone weights, backbone optimizer, lr
                                                    scheduler, loss scaler, extra (trainer) state
    head_replicated.pt                              head state every rank holds alike (step,
                                                    log_tau), its optimizer state, param groups
    head_classes_000000000_000000006.pt             one per saving rank, named by CLASS RANGE:
    head_classes_000000006_000000011.pt             W rows, bank rows, optimizer rows of W
    rng_rank0.pt, rng_rank1.pt                      per-process RNG states

Where things live in this package:

=================  ===============================================================================
``format``         names, format version, manifest schema, sha256, weights_only safety, safe loading
``state``          what goes into each file: class-sharded vs replicated head state, payloads
``rng``            per-process RNG states: saved, restored, or reseeded on another world size
``durable``        fsync, atomic replacement of small files, a full disk named
``collectives``    JSON all-gather, every rank raising together
``writer``         :func:`save_checkpoint` and the commit protocol (manifest last, atomic rename)
``async_writer``   :class:`AsyncCheckpointWriter`: stage in the training thread, write in another
``reader``         :func:`read_manifest`, :func:`find_latest`, :func:`check_checkpoint`,
                   :func:`load_checkpoint`, what counts as verified good
``reshard``        head shards saved on ``N`` ranks loaded on ``M``; optimizer state by name
``retention``      ``keep_last`` pruning, the ``best`` checkpoint
``backbone_state`` the backbone alone (:func:`export_backbone_state`, :func:`load_backbone_and_extra`)
=================  ===============================================================================

Safety: every file is read with ``torch.load(..., weights_only=True)`` and checked against the
manifest's size and sha256 first; metadata is JSON. Nothing in a checkpoint can run code.

Gradient/optimizer semantics:
    Rows of W are saved and restored with their own optimizer state, row for row (SGD
    ``momentum_buffer``, AdamW ``exp_avg``/``exp_avg_sq``; the scalar per-parameter ``step`` is the
    same on every rank and is kept once per shard file). Partial FC samples a subset of classes per
    step: a row that is not sampled is left alone by the lazy row optimizers (``head.row_update``)
    or gets a zero gradient from a dense one (SGD momentum decays, AdamW moments decay); either way
    the checkpoint records the state exactly, so such rows keep their optimizer state unchanged
    through save/load and through resharding. Resharding moves rows between ranks but never mixes,
    averages or resets them.

The names below are the package's interface (other modules import them from ``train.checkpoint``);
tests reach private helpers in their own modules (e.g. ``train.checkpoint.reader._HASH_VERIFIED``).
"""

from __future__ import annotations

from .async_writer import AsyncCheckpointWriter, snapshot
from .backbone_state import export_backbone_state, load_backbone_and_extra
from .format import (BACKBONE_FILE, FORMAT, FORMAT_VERSION, LATEST, MANIFEST, REPLICATED_FILE, CheckpointError,
                     PathLike, rng_file_name, shard_file_name, step_dir_name)
from .reader import check_checkpoint, find_latest, list_checkpoints, load_checkpoint, read_manifest
from .retention import BEST, BEST_RECORD, keep_as_best, read_best
from .state import _strip_module_prefix, _unwrap
from .writer import save_checkpoint

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "find_latest",
    "list_checkpoints",
    "check_checkpoint",
    "export_backbone_state",
    "load_backbone_and_extra",
    "read_manifest",
    "AsyncCheckpointWriter",
    "keep_as_best",
    "read_best",
    "snapshot",
    "BEST",
]

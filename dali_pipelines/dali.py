"""NVIDIA DALI loader: JPEG decode + flip + normalise in DALI, order chosen by us.

Why ``fn.external_source`` rather than ``fn.readers.mxnet`` for training:
DALI's RecordIO reader sorts its index by offset and shuffles with a bounded
buffer of its own, and shards by contiguous ranges. That cannot reproduce a
seeded global per-epoch permutation, nor resume at an exact sample. Here the
per-rank order (``sampling.epoch_order``) is computed up front and each batch's
encoded JPEGs are handed to DALI as zero-copy slices of the memory-mapped
``.rec`` (reading ~5 KB per image is negligible next to decoding), together
with labels and the per-sample flip flags. Decoding, mirroring and
normalisation run in DALI's thread pool (``device="cpu"``) or on the GPU
(``device="mixed"``). The outcome is bit-for-bit the same sample order and
flips as the PyTorch fallback and an exact resume.

``mxnet_reader_pipeline`` builds the native ``fn.readers.mxnet`` pipeline; it is
used to check RecordIO compatibility and in the benchmark.

DALI is imported inside functions only, so ``import dali_pipelines`` works
without it.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from .base import Batch, CorruptImageError, TrainLoader
from .dataset import FaceRecordDataset

#: Mixed-decoder settings for 112x112 face crops (see ``gpu_decoder_options``).
GPU_DECODER_DEFAULTS: dict[str, Any] = {
    # Share of images sent to the A100/H100 hardware JPEG engine; the rest go to
    # the CUDA decoder. ~0.65-0.75 balances both on those GPUs.
    "hw_decoder_load": 0.65,
    # Images above this many pixels use nvJPEG's hybrid Huffman decoder, smaller
    # ones the host-side Huffman decoder. A 112x112 crop has 12,544 pixels; for
    # such tiny images host-side entropy decoding in DALI's CPU threads is the
    # cheap path, so the threshold stays far above that (stated explicitly so a
    # change of DALI's default cannot silently move small images).
    "hybrid_huffman_threshold": 1_000_000,
    # Same chroma upsampling as the CPU decoder (libjpeg-turbo "fancy"), so GPU
    # batches match the CPU path and the PyTorch fallback within rounding.
    "jpeg_fancy_upsampling": True,
}


def dali_available() -> bool:
    """True when ``nvidia.dali`` can be imported."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def _require_dali() -> None:
    if not dali_available():
        raise ImportError(
            "kind='dali' needs NVIDIA DALI: pip install nvidia-dali-cuda130==2.4.0 "
            "(or use kind='torch')"
        )


def _decode_and_augment(jpegs: Any, mirror: Any, *, decoder_device: str, image_size: int,
                        fp16: bool, hwc: bool, gpu_options: dict[str, Any] | None) -> Any:
    """DALI graph: decode -> (crop/pad to size) + mirror + normalise in one op."""
    from nvidia.dali import fn, types

    kw: dict[str, Any] = {}
    if decoder_device == "mixed":
        kw = dict(GPU_DECODER_DEFAULTS)
        kw.update(gpu_options or {})
        kw.setdefault("preallocate_width_hint", image_size)
        kw.setdefault("preallocate_height_hint", image_size)
    images = fn.decoders.image(jpegs, device=decoder_device, output_type=types.RGB, **kw)
    # crop_mirror_normalize fuses the flip with normalisation (one pass over the
    # pixels instead of fn.flip + normalize); `mirror` takes per-sample flags.
    return fn.crop_mirror_normalize(
        images,
        dtype=types.FLOAT16 if fp16 else types.FLOAT,
        output_layout="HWC" if hwc else "CHW",
        crop=(image_size, image_size),
        out_of_bounds_policy="pad",
        mean=[127.5, 127.5, 127.5],
        std=[127.5, 127.5, 127.5],
        mirror=mirror,
    )


def external_pipeline(source: Callable[[], tuple[list[np.ndarray], np.ndarray, np.ndarray]], *,
                      batch_size: int, num_threads: int, device_id: int | None, image_size: int = 112,
                      fp16: bool = False, hwc: bool = False, seed: int = 0,
                      gpu_options: dict[str, Any] | None = None, prefetch: int = 2) -> Any:
    """Builds the training pipeline fed by ``source``.

    Args:
        source: Called once per batch; returns ``(jpegs: B x [L] uint8,
            labels [B, 1] int64, mirror [B] int32)`` or raises ``StopIteration``.
        batch_size: ``B``.
        num_threads: DALI CPU threads.
        device_id: CUDA device for the mixed decoder, or None for CPU-only.
        image_size: Output side.
        fp16: Output float16 instead of float32.
        hwc: Output ``[H, W, 3]`` samples (for channels_last) instead of ``[3, H, W]``.
        seed: Pipeline seed.
        gpu_options: Overrides of ``GPU_DECODER_DEFAULTS``.
        prefetch: Prefetch queue depth.

    Returns:
        A built ``nvidia.dali.Pipeline`` with outputs ``(images, labels)``.
    """
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                  seed=seed, prefetch_queue_depth=prefetch)
    def _pipe() -> Any:
        jpegs, labels, mirror = fn.external_source(
            source=source, num_outputs=3, batch=True,
            dtype=[types.UINT8, types.INT64, types.INT32],
        )
        images = _decode_and_augment(
            jpegs, mirror, decoder_device="cpu" if device_id is None else "mixed",
            image_size=image_size, fp16=fp16, hwc=hwc, gpu_options=gpu_options,
        )
        return images, labels

    pipe = _pipe()
    pipe.build()
    return pipe


def mxnet_reader_pipeline(rec_path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
                          index_path: str | os.PathLike[str], *,
                          batch_size: int, num_threads: int = 2, device_id: int | None = None,
                          shard_id: int = 0, num_shards: int = 1, shuffle: bool = False, seed: int = 0,
                          decode: bool = True, image_size: int = 112, flip: bool = True) -> Any:
    """Builds a pipeline around DALI's native ``fn.readers.mxnet``.

    Args:
        rec_path: The ``.rec`` file, or the shard files of a sharded dataset.
        index_path: One index listing image records only; for several files
            its offsets run through their concatenation (both from
            ``FaceRecordDataset.dali_reader_inputs()``).
        decode: False returns the raw encoded bytes, for compatibility checks.
        flip: Random flips via ``fn.random.coin_flip`` (decode only).

    Returns:
        A built pipeline with outputs ``(images or encoded bytes, labels float32)``.
        The reader is named ``"Reader"``.
    """
    from nvidia.dali import fn, pipeline_def

    recs = [str(p) for p in rec_path] if isinstance(rec_path, (list, tuple)) else [str(rec_path)]
    idxs = [str(index_path)]  # DALI's reader takes one index over all files

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed)
    def _pipe() -> Any:
        jpegs, labels = fn.readers.mxnet(
            path=recs, index_path=idxs, shard_id=shard_id,
            num_shards=num_shards, random_shuffle=shuffle, seed=seed, pad_last_batch=True,
            name="Reader",
        )
        if not decode:
            return jpegs, labels
        mirror = fn.random.coin_flip(probability=0.5 if flip else 0.0)
        images = _decode_and_augment(
            jpegs, mirror, decoder_device="cpu" if device_id is None else "mixed",
            image_size=image_size, fp16=False, hwc=False, gpu_options=None,
        )
        return images, labels

    pipe = _pipe()
    pipe.build()
    return pipe


class _Feeder:
    """``external_source`` callback: yields batches ``start, start+1, ...`` of a plan."""

    def __init__(self, loader: DaliRecordLoader, idx: np.ndarray, flips: np.ndarray, start: int):
        self.loader = loader
        self.idx = idx
        self.flips = flips.astype(np.int32)
        self.next = start
        self.substituted: dict[int, list[int]] = {}

    def __call__(self) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        b, bs = self.next, self.loader.batch_size
        if (b + 1) * bs > len(self.idx):
            raise StopIteration
        self.next += 1
        ind = self.idx[b * bs : (b + 1) * bs].copy()
        bad = self.loader.bad_images
        if bad:
            is_bad = np.fromiter((int(i) in bad for i in ind), dtype=bool, count=len(ind))
            if is_bad.any():
                good = ind[~is_bad]
                if good.size == 0:
                    raise CorruptImageError(f"no image of batch {b} decodes")
                self.substituted[b] = [int(i) for i in ind[is_bad]]
                ind[is_bad] = good[0]  # keep the batch size fixed across ranks
        ds = self.loader.dataset
        jpegs = [ds.encoded_image(int(i)) for i in ind]
        labels = np.ascontiguousarray(ds.labels[ind], dtype=np.int64).reshape(-1, 1)
        return jpegs, labels, self.flips[b * bs : (b + 1) * bs]


class DaliRecordLoader(TrainLoader):
    """DALI loader; see ``build_train_loader(kind="dali")`` for arguments.

    Args:
        dataset: The image records.
        num_threads: DALI CPU threads.
        strict: Raise on undecodable records instead of skipping them.
        gpu_options: Overrides of ``GPU_DECODER_DEFAULTS`` (GPU only).
        **kwargs: ``TrainLoader`` arguments.
    """

    kind = "dali"
    #: Prefetch queue depth of the training pipeline (batches decoded ahead of the one returned).
    _PREFETCH = 2

    def __init__(self, dataset: FaceRecordDataset, *, num_threads: int = 2, strict: bool = False,
                 gpu_options: dict[str, Any] | None = None, **kwargs: Any) -> None:
        _require_dali()
        super().__init__(len(dataset), **kwargs)
        self.dataset = dataset
        self.num_threads = int(num_threads)
        self.strict = bool(strict)
        self.gpu_options = gpu_options
        if self.device.type == "cuda":
            self.device_id: int | None = (
                self.device.index if self.device.index is not None else torch.cuda.current_device()
            )
        elif self.device.type == "cpu":
            self.device_id = None
        else:
            raise ValueError(f"kind='dali' supports cpu and cuda devices, got {self.device}")
        #: Dataset positions found undecodable; substituted from then on.
        self.bad_images: dict[int, str] = {}

    @property
    def num_classes(self) -> int:
        """Classes in the dataset."""
        return self.dataset.num_classes

    @property
    def class_counts(self) -> np.ndarray:
        """``[num_classes] int64`` images per class."""
        return self.dataset.class_counts

    def _find_bad(self, indices: np.ndarray) -> list[int]:
        """Finds the records of a failed batch that PIL cannot decode either."""
        from PIL import Image

        found = []
        for i in indices:
            i = int(i)
            if i in self.bad_images:
                continue
            try:
                with Image.open(io.BytesIO(self.dataset.encoded_image(i).tobytes())) as im:
                    im.load()
            except Exception as e:  # any failure marks the record as bad
                where = self.dataset.where(i)
                if self.strict:
                    raise CorruptImageError(
                        f"cannot decode image {where}: {e}; pass strict=False to skip such records"
                    ) from e
                self.bad_images[i] = f"{type(e).__name__}: {e}"
                found.append(i)
        return found

    def _iter_batches(self) -> Iterator[Batch]:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        idx, flips = self.epoch_plan()
        n_batches = len(idx) // self.batch_size
        done = 0
        hwc = self.memory_format == torch.channels_last
        while done < n_batches:
            feeder = _Feeder(self, idx, flips, done)
            pipe = external_pipeline(
                feeder, batch_size=self.batch_size, num_threads=self.num_threads,
                device_id=self.device_id, image_size=self.image_size,
                fp16=self.dtype == torch.float16, hwc=hwc, seed=self.seed,
                gpu_options=self.gpu_options, prefetch=self._PREFETCH,
            )
            it = None
            try:
                # Inside the try: building the iterator prefetches (decodes) the first batches,
                # so a corrupt image there must take the same skip-or-raise path as later ones.
                it = DALIGenericIterator([pipe], ["images", "labels"], auto_reset=False)
                while True:
                    try:
                        out = next(it)
                    except StopIteration:
                        done = n_batches
                        break
                    for i in feeder.substituted.pop(done, []):
                        self._note_skip(self.dataset.where(i), int(self.dataset.image_keys[i]),
                                        self.bad_images.get(i, "undecodable"))
                    done += 1
                    d = out[0]
                    yield self._finish(d["images"], d["labels"], layout="NHWC" if hwc else "NCHW",
                                       normalized=True)
            except (RuntimeError, ValueError) as e:
                if isinstance(e, CorruptImageError):
                    raise
                # DALI's decoder failed on batch `done` or on one it prefetched after it: find
                # the culprit(s) with PIL, then rebuild the pipeline from batch `done` with them
                # substituted.
                ahead = done + 1 + self._PREFETCH
                failed = idx[done * self.batch_size : min(ahead, n_batches) * self.batch_size]
                if not self._find_bad(failed):
                    raise
            finally:
                del it, pipe

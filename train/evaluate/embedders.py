"""One interface for embeddings, whatever the model comes as, and the image sources ``pfc eval`` reads.

Models (:func:`load_embedder`):

- a training checkpoint (a run directory, its ``checkpoints/`` root, or one ``step_*`` directory):
  the backbone is built from the checkpoint's ``extra_state`` (``backbone`` name and
  ``embedding_size``) and gets the checkpoint's weights;
- an exported backbone state dict (``pfc export`` output ``backbone.pt``: ``{"state_dict",
  "metadata"}``), built from its metadata;
- an ONNX file, run by onnxruntime with the CPUExecutionProvider.

Every file is read safely: torch files with ``weights_only=True``, checkpoints through
:mod:`train.checkpoint` (sha256-checked), ``.bin`` pair sets through the restricted unpickler.

Images (uint8 RGB ``[N, 3, S, S]``, normalised as in training, ``(x - 127.5) / 127.5``): a ``.bin``
pair set (:func:`train.evaluate.runner.load_pair_set`), a RecordIO ``.rec`` (:func:`embed_rec`), or
an image directory for template lists (:func:`embed_image_tokens`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .runner import embed_images

__all__ = [
    "Embedder",
    "ImageSource",
    "embed_image_tokens",
    "embed_rec",
    "find_run_config",
    "load_embedder",
    "resolve_checkpoint",
]

log = logging.getLogger(__name__)


@dataclass
class Embedder:
    """A model as a function of normalised images, plus what a report needs to say about it.

    Attributes:
        forward: ``[B, 3, S, S]`` float32 normalised images on ``device`` -> ``[B, D]`` embeddings
            (not necessarily normalised).
        device: Where inputs go.
        kind: ``"checkpoint"``, ``"weights"`` or ``"onnx"``.
        source: The file or directory the model came from.
        backbone: Backbone name (``"?"`` when an ONNX file does not say).
        embedding_size: ``D``.
        image_size: ``S``.
        info: Anything else worth reporting (checkpoint step, ONNX metadata...).
        checkpoint_dir: The ``step_*`` directory when the model came from a checkpoint.
    """

    forward: Callable[[torch.Tensor], torch.Tensor]
    device: torch.device
    kind: str
    source: str
    backbone: str
    embedding_size: int
    image_size: int = 112
    info: dict = field(default_factory=dict)
    checkpoint_dir: Optional[Path] = None
    input_mean: float = 127.5
    input_std: float = 127.5

    def embed(self, images: torch.Tensor, batch_size: int = 128, flip: bool = False,
              normalize: bool = True) -> torch.Tensor:
        """Embeddings of uint8 ``[N, 3, S, S]`` images (``[N, D]`` fp32 on CPU), L2-normalised
        unless ``normalize=False``.

        With ``flip`` each embedding is the sum of the image's and its mirror image's before
        normalising (flip-test fusion).
        """
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 [N, 3, S, S], got {images.dtype} {tuple(images.shape)}")
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            raise ValueError(f"the model takes {self.image_size}x{self.image_size} images, got "
                             f"{images.shape[-2]}x{images.shape[-1]}; pass --image-size to decode at another size")
        e = embed_images(self.forward, images, self.device, batch_size=batch_size, flip=flip,
                         mean=self.input_mean, std=self.input_std, normalize=normalize)
        if e.shape[0] and e.shape[1] != self.embedding_size:
            # The model is the authority on its own output: report what it produced.
            log.warning("%s produces %d-d embeddings, not the %d-d it declared", self.source, e.shape[1],
                        self.embedding_size)
            self.info["declared_embedding_size"] = self.embedding_size
            self.embedding_size = int(e.shape[1])
        return e

    def describe(self) -> dict:
        """JSON-ready description of the model."""
        return {"kind": self.kind, "source": self.source, "backbone": self.backbone,
                "embedding_size": self.embedding_size, "image_size": self.image_size,
                "input_normalization": f"(x - {self.input_mean:g}) / {self.input_std:g} on RGB uint8 pixels",
                **self.info}


# ------------------------------------------------------------------------------------ models
def resolve_checkpoint(path: str | Path) -> Path:
    """The ``step_*`` directory a run directory, a checkpoint root or a step directory points to.

    Raises:
        FileNotFoundError: Nothing there, or no complete checkpoint under it.
    """
    from train.checkpoint import MANIFEST, find_latest

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint path {p} does not exist")
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    if (p / MANIFEST).is_file():
        return p
    latest = find_latest(p) if p.is_dir() else None
    if latest is None:
        raise FileNotFoundError(f"no complete checkpoint (a step_* directory with manifest.json) under {p}")
    return latest


def find_run_config(step_dir: Path, levels: int = 3) -> Optional[Path]:
    """The run's ``config.toml`` in ``step_dir`` or up to ``levels`` directories above it."""
    d = Path(step_dir)
    for _ in range(levels + 1):
        if (d / "config.toml").is_file():
            return d / "config.toml"
        d = d.parent
    return None


def _torch_embedder(model: torch.nn.Module, device: torch.device, **kw) -> Embedder:
    model = model.to(device).eval()

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(x)

    return Embedder(forward=forward, device=device, **kw)


def _build(name: str, embedding_size: int, state: dict, where: str) -> torch.nn.Module:
    from partial_fc.backbones import build_backbone, list_backbones

    if name not in list_backbones():
        raise ValueError(f"{where} names backbone {name!r}, which this version does not know "
                         f"(known: {list_backbones()})")
    model = build_backbone(name, num_features=embedding_size)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{where}: the weights do not fit backbone {name!r} with embedding size "
                         f"{embedding_size}: {str(e).splitlines()[0]}") from e
    return model


def _from_checkpoint(path: str | Path, device: torch.device) -> Embedder:
    from train.checkpoint import CheckpointError, load_backbone_and_extra

    step_dir = resolve_checkpoint(path)
    try:
        state, extra = load_backbone_and_extra(step_dir)
    except CheckpointError as e:
        raise ValueError(str(e)) from e
    name, dim = extra.get("backbone"), extra.get("embedding_size")
    if name is None or dim is None:
        # Checkpoints of older trainers lack these: the run's config says the same.
        cfg_path = find_run_config(step_dir)
        if cfg_path is None:
            raise ValueError(f"{step_dir} records no backbone name and no config.toml is above it")
        from train.config import load_config

        b = load_config(cfg_path).backbone
        name, dim = b.name, b.num_features
    model = _build(str(name), int(dim), state, str(step_dir))
    step = int(step_dir.name.split("_")[-1]) if step_dir.name.startswith("step_") else None
    return _torch_embedder(model, device, kind="checkpoint", source=str(step_dir), backbone=str(name),
                           embedding_size=int(dim), info={"step": step}, checkpoint_dir=step_dir)


def _from_weights(path: str | Path, device: torch.device) -> Embedder:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"weights file {p} does not exist")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not our export"
        raise ValueError(f"{p} is not a safe torch file (weights_only loading refused it: {e})") from e
    if not isinstance(obj, dict) or "state_dict" not in obj or "metadata" not in obj:
        raise ValueError(f"{p} is not a `pfc export` backbone file (a dict with 'state_dict' and 'metadata'); "
                         "for a training checkpoint use --checkpoint")
    meta = obj["metadata"]
    if "backbone" not in meta or "embedding_size" not in meta:
        raise ValueError(f"{p}: metadata lacks 'backbone'/'embedding_size': {sorted(meta)}")
    name, dim = str(meta["backbone"]), int(meta["embedding_size"])
    model = _build(name, dim, obj["state_dict"], str(p))
    info = {k: meta[k] for k in ("step", "checkpoint") if k in meta}
    return _torch_embedder(model, device, kind="weights", source=str(p), backbone=name, embedding_size=dim,
                           info=info)


def _from_onnx(path: str | Path, input_mean: Optional[float] = None, input_std: Optional[float] = None,
               image_size: Optional[int] = None) -> Embedder:
    """An onnxruntime embedder.

    A file written by ``pfc export`` states its input normalisation in its metadata. A file
    without that metadata (e.g. a model from another project) is refused unless the caller states
    the normalisation (``input_mean``/``input_std``): evaluating under a guessed normalisation
    gives plausible-looking but wrong figures. The embedding size is the model's real output
    size (its output shape, or the output of one probe image), never only what metadata claims.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"ONNX file {p} does not exist")
    try:
        import onnxruntime as ort
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("ONNX evaluation needs onnxruntime: pip install 'partial-fc[onnx]'") from e
    try:
        session = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise ValueError(f"onnxruntime cannot load {p}: {e}") from e
    inp = session.get_inputs()[0]
    meta = dict(session.get_modelmeta().custom_metadata_map)
    shape = inp.shape
    if len(shape) != 4 or shape[1] != 3:
        raise ValueError(f"{p}: input {inp.name!r} has shape {shape}; expected [batch, 3, S, S]")
    fixed = shape[2] if isinstance(shape[2], int) else None
    if fixed is not None and image_size is not None and image_size != fixed:
        raise ValueError(f"{p} takes {fixed}x{fixed} inputs; --image-size {image_size} contradicts it")
    size = fixed or image_size or 112
    from train.export import INPUT_NORMALIZATION

    norm = meta.get("input_normalization")
    stated = input_mean is not None or input_std is not None
    if norm is None and not stated:
        raise ValueError(
            f"{p} carries no 'input_normalization' metadata (it was not written by `pfc export`), so pfc eval "
            f"cannot know how to feed it. pfc eval's own models take RGB uint8 pixels as (x - 127.5) / 127.5 at "
            f"{size}x{size}; if this model expects that too (insightface's ArcFace models do), say so with "
            "--input-mean 127.5 --input-std 127.5, otherwise give its own mean and std "
            "(and --image-size when its input size is not fixed)")
    if norm is not None and norm != INPUT_NORMALIZATION:
        raise ValueError(f"{p} expects input normalisation {norm!r}; pfc eval feeds {INPUT_NORMALIZATION!r}")
    mean = 127.5 if input_mean is None else float(input_mean)
    std = 127.5 if input_std is None else float(input_std)
    if not (np.isfinite(mean) and np.isfinite(std) and std > 0):
        raise ValueError(f"--input-mean {mean} / --input-std {std}: need finite values and std > 0")
    if norm is not None and (mean, std) != (127.5, 127.5):
        raise ValueError(f"{p} states its normalisation {norm!r}; --input-mean {mean:g} --input-std {std:g} "
                         "contradict it")

    def forward(x: torch.Tensor) -> torch.Tensor:
        out = session.run(None, {inp.name: x.detach().cpu().float().numpy()})[0]
        return torch.from_numpy(np.ascontiguousarray(out))

    out_shape = session.get_outputs()[0].shape
    if len(out_shape) == 2 and isinstance(out_shape[-1], int):
        dim = int(out_shape[-1])
    else:  # a symbolic output size: ask the model
        probe = forward(torch.zeros(1, 3, size, size))
        if probe.dim() != 2:
            raise ValueError(f"{p}: output has shape {tuple(probe.shape)}; expected [batch, D] embeddings")
        dim = int(probe.shape[1])
    info = {"provider": "CPUExecutionProvider"}
    if norm is None:
        info["input_normalization_source"] = "stated on the command line (the file has no metadata)"
    declared = meta.get("embedding_size")
    if declared is not None and declared != str(dim):
        log.warning("%s declares embedding_size %s in its metadata but outputs %d-d embeddings", p, declared, dim)
        info["declared_embedding_size"] = declared
    return Embedder(forward=forward, device=torch.device("cpu"), kind="onnx", source=str(p),
                    backbone=meta.get("backbone", "?"), embedding_size=dim, image_size=int(size),
                    info=info, input_mean=mean, input_std=std)


def load_embedder(
    *, checkpoint: str | Path | None = None, weights: str | Path | None = None, onnx: str | Path | None = None,
    device: str | torch.device = "cpu", input_mean: Optional[float] = None, input_std: Optional[float] = None,
    image_size: Optional[int] = None,
) -> Embedder:
    """Builds the embedder of exactly one model source.

    Args:
        checkpoint: A run directory, checkpoint root or ``step_*`` directory.
        weights: A ``pfc export`` ``backbone.pt``.
        onnx: An ONNX file (always run on CPU by onnxruntime).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"auto"`` for the torch sources.
        input_mean, input_std: ONNX only: the input normalisation of a file without our
            metadata (required for such a file; see :func:`_from_onnx`).
        image_size: ONNX only: the input side when the file does not fix it.

    Raises:
        ValueError: Not exactly one source, an unknown device, or a file that is not what it
            should be.
        FileNotFoundError: A missing path.
    """
    given = [n for n, v in (("checkpoint", checkpoint), ("weights", weights), ("onnx", onnx)) if v]
    if len(given) != 1:
        raise ValueError(f"give exactly one of checkpoint, weights, onnx (got {given or 'none'})")
    if onnx:
        return _from_onnx(onnx, input_mean, input_std, image_size)
    if input_mean is not None or input_std is not None:
        raise ValueError("--input-mean/--input-std apply to ONNX files without metadata only; checkpoints and "
                         "`pfc export` weights are fed as in training, (x - 127.5) / 127.5")
    dev = _device(device)
    return _from_checkpoint(checkpoint, dev) if checkpoint else _from_weights(weights, dev)


def _device(device: str | torch.device) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    return dev


# ------------------------------------------------------------------------------------ images
class ImageSource:
    """Decoded images by token: positions in a RecordIO ``.rec``, or paths under a directory.

    Args:
        path: A ``.rec`` file (its ``.idx`` next to it) or a directory of image files.
        image_size: Side the images are centre-cropped / padded to.
    """

    def __init__(self, path: str | Path, image_size: int = 112) -> None:
        from dali_pipelines.decode import fit_size, get_decoder

        self.path = Path(path)
        self.image_size = image_size
        self._decode, self._fit = get_decoder("auto"), fit_size
        self.dataset = None
        if self.path.is_file() and self.path.suffix == ".rec":
            from dali_pipelines import FaceRecordDataset

            self.dataset = FaceRecordDataset(self.path)
        elif not self.path.is_dir():
            raise FileNotFoundError(f"image source {self.path} is neither a .rec file nor a directory")

    @property
    def labels(self) -> np.ndarray:
        """``[N]`` int64 labels of a ``.rec`` source."""
        if self.dataset is None:
            raise ValueError(f"{self.path} is a directory: it has no labels")
        return np.asarray(self.dataset.labels, dtype=np.int64)

    def __len__(self) -> int:
        if self.dataset is None:
            raise ValueError(f"{self.path} is a directory: images are addressed by path")
        return len(self.dataset)

    def load(self, tokens: Sequence[str | int]) -> torch.Tensor:
        """uint8 ``[len(tokens), 3, S, S]`` images of the given positions (``.rec``) or paths."""
        out = np.empty((len(tokens), self.image_size, self.image_size, 3), dtype=np.uint8)
        for i, tok in enumerate(tokens):
            out[i] = self._fit(self._read(tok), self.image_size)
        return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()

    def _read(self, tok: str | int) -> np.ndarray:
        if self.dataset is not None:
            try:
                pos = int(tok)
            except ValueError:
                raise ValueError(f"image {tok!r}: a .rec source addresses images by 0-based position") from None
            if not 0 <= pos < len(self.dataset):
                raise ValueError(f"image position {pos} is outside {self.path} ({len(self.dataset)} images)")
            img = self._decode(self.dataset.encoded_image(pos))
        else:
            f = (self.path / str(tok)).resolve()
            if self.path.resolve() not in f.parents:
                raise ValueError(f"image path {tok!r} leaves the image directory {self.path}")
            if not f.is_file():
                raise FileNotFoundError(f"image {f} does not exist")
            img = self._decode(f.read_bytes())
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        return img


def embed_image_tokens(
    embedder: Embedder, source: ImageSource, tokens: Sequence[str | int], batch_size: int = 128,
    flip: bool = False,
) -> torch.Tensor:
    """Embeddings of the given images, decoded a batch at a time (``[len(tokens), D]``).

    Repeated tokens are embedded once.
    """
    uniq, inverse = np.unique(np.asarray([str(t) for t in tokens]), return_inverse=True)
    chunks = []
    for i in range(0, len(uniq), batch_size):
        chunks.append(embedder.embed(source.load(list(uniq[i : i + batch_size])), batch_size, flip))
    emb = torch.cat(chunks) if chunks else torch.zeros(0, embedder.embedding_size)
    return emb[torch.from_numpy(inverse.ravel())]


def embed_rec(
    embedder: Embedder, rec_path: str | Path, batch_size: int = 128, flip: bool = False,
) -> tuple[torch.Tensor, np.ndarray]:
    """Embeddings and labels of every image of a ``.rec`` file.

    Returns:
        ``(embeddings [N, D], labels [N] int64)``.
    """
    src = ImageSource(rec_path, embedder.image_size)
    n = len(src)
    chunks = [embedder.embed(src.load(list(range(i, min(i + batch_size, n)))), batch_size, flip)
              for i in range(0, n, batch_size)]
    return torch.cat(chunks), src.labels


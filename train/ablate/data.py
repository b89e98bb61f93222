"""A study's data: the synthetic dataset it trains on (made once, reused while its config matches),
the decoded held-out images each protocol evaluates on, and the "hard" identities of ``ablate-v1``.

* :func:`ensure_dataset`: generate (or reuse) the dataset of a :class:`~train.ablate.spec.StudySpec`.
* :class:`EvalData`: protocol ``ablate-v1``: verification pairs (with the hard-pair mask) and the
  clustering split.
* :class:`StudyData`: protocol ``study-v2``: the held-out (clustering) split, the probe images of the
  training identities and the ground truth (families, class sizes, nuisance).
* :func:`make_eval_data`: the one of the two that a spec's protocol needs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .spec import StudySpec

__all__ = ["ensure_dataset", "decode_rec", "hard_identities", "hard_pair_mask", "EvalData", "StudyData",
           "make_eval_data"]


def ensure_dataset(spec: StudySpec, data_dir: Path) -> dict[str, Any]:
    """Generates the study's dataset in ``data_dir`` unless the same one is already there."""
    from dali_pipelines.synth_faces import generate_synthetic_dataset

    sc = spec.synth_config()
    want = sc.record()
    meta = data_dir / "identities.json"
    needed = ("train.rec", "train.idx", "verification.bin", "cluster.rec", "cluster.idx")
    if meta.is_file() and all((data_dir / n).is_file() for n in needed):
        try:
            have = json.loads(meta.read_text()).get("config")
        except (OSError, ValueError):
            have = None
        if have == want:
            return {"out_dir": str(data_dir), "reused": True}
    summary = generate_synthetic_dataset(data_dir, sc, progress=False)
    summary["reused"] = False
    return summary


def decode_rec(path: Path, image_size: int):
    """Every image of a RecordIO file, decoded and fitted to ``image_size``.

    Returns:
        ``(images [N, 3, S, S] uint8 tensor, labels [N] int64 array)``.
    """
    import torch

    from dali_pipelines import FaceRecordDataset
    from dali_pipelines.decode import fit_size, get_decoder

    decode = get_decoder("auto")
    ds = FaceRecordDataset(path)
    try:
        imgs = torch.from_numpy(np.stack([fit_size(decode(ds.encoded_image(i)), image_size) for i in range(len(ds))]))
        labels = np.asarray(ds.labels, dtype=np.int64)
    finally:
        ds.close()
    return imgs.permute(0, 3, 1, 2).contiguous(), labels


# ------------------------------------------------------------------------------------ hard identities
def hard_identities(difficulty: Sequence[float], fraction: float = 1.0 / 3.0) -> np.ndarray:
    """Mask of the hardest ``ceil(fraction * n)`` identities by ground-truth difficulty.

    Ties at the cut are broken by position (stable), so exactly that many are selected.

    Args:
        difficulty: ``[n]`` per-identity difficulty (higher = harder).
        fraction: Fraction of identities that count as hard, in (0, 1].

    Returns:
        ``[n]`` bool.
    """
    d = np.asarray(difficulty, dtype=np.float64)
    if d.ndim != 1 or d.size == 0:
        raise ValueError(f"difficulty must be a non-empty 1-d sequence, got shape {d.shape}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    k = int(math.ceil(fraction * d.size - 1e-9))
    order = np.argsort(-d, kind="stable")
    mask = np.zeros(d.size, dtype=bool)
    mask[order[:k]] = True
    return mask


def hard_pair_mask(pair_ids: np.ndarray, identities: Sequence[int], difficulty: Sequence[float],
                   fraction: float = 1.0 / 3.0) -> np.ndarray:
    """Which pairs involve a hard identity (see :func:`hard_identities`).

    A genuine pair (both sides the same identity) is hard when its identity is; an impostor pair
    when at least one of its identities is, matching the generator's ``pair_difficulty``
    (the max of the two).

    Args:
        pair_ids: ``[P, 2]`` identity ids of each pair's two images.
        identities: ``[n]`` the verification identity ids.
        difficulty: ``[n]`` their difficulties.

    Returns:
        ``[P]`` bool.
    """
    pair_ids = np.asarray(pair_ids, dtype=np.int64)
    if pair_ids.ndim != 2 or pair_ids.shape[1] != 2:
        raise ValueError(f"pair_ids must be [P, 2], got shape {pair_ids.shape}")
    hard = set(np.asarray(identities, dtype=np.int64)[hard_identities(difficulty, fraction)].tolist())
    known = set(np.asarray(identities, dtype=np.int64).tolist())
    unknown = set(pair_ids.ravel().tolist()) - known
    if unknown:
        raise ValueError(f"pairs reference identities without a difficulty: {sorted(unknown)[:5]}")
    return np.array([a in hard or b in hard for a, b in pair_ids.tolist()], dtype=bool)


# ------------------------------------------------------------------------------------ held-out data
class EvalData:
    """The decoded held-out splits of an ``ablate-v1`` study, shared by all its runs.

    Attributes:
        ver_images: ``[U, 3, S, S]`` uint8, the distinct images of the verification pairs.
        pair_index: ``[P, 2]`` int64 rows of ``ver_images`` of each pair.
        issame: ``[P]`` bool.
        hard: ``[P]`` bool, the hard pairs (see :func:`hard_pair_mask`).
        cluster_images: ``[M, 3, S, S]`` uint8.
        cluster_labels: ``[M]`` int64 identity of each clustering image.
    """

    def __init__(self, data_dir: Path, image_size: int = 112) -> None:
        import torch

        from dali_pipelines import load_verification_bin
        from dali_pipelines.decode import fit_size, get_decoder

        decode = get_decoder("auto")
        blobs, issame = load_verification_bin(data_dir / "verification.bin")
        # The generator draws every pair from a small pool of rendered images: embed each once.
        index: dict[bytes, int] = {}
        rows = np.empty(len(blobs), dtype=np.int64)
        for i, b in enumerate(blobs):
            rows[i] = index.setdefault(bytes(b), len(index))
        uniq = sorted(index, key=index.__getitem__)
        self.ver_images = torch.from_numpy(np.stack([fit_size(decode(b), image_size) for b in uniq])) \
            .permute(0, 3, 1, 2).contiguous()
        self.pair_index = rows.reshape(-1, 2)
        self.issame = np.asarray(issame, dtype=bool)
        meta = json.loads((data_dir / "identities.json").read_text())
        v = meta["verification"]
        if len(v["pairs"]) != len(self.issame):
            raise ValueError(f"{data_dir}: identities.json lists {len(v['pairs'])} pairs, verification.bin "
                             f"has {len(self.issame)}; regenerate the dataset")
        self.hard = hard_pair_mask(np.asarray(v["pairs"]), v["identities"], v["difficulty"])
        self.cluster_images, self.cluster_labels = decode_rec(data_dir / "cluster.rec", image_size)


class StudyData:
    """The decoded held-out, probe and (on demand) training images and the ground truth of a
    ``study-v2`` study.

    Attributes:
        heldout_images: ``[M, 3, S, S]`` uint8 of the clustering split (all images).
        heldout_labels: ``[M]`` identity index within that split.
        heldout: ``{"family", "difficulty"}`` per held-out identity.
        probe_images, probe_labels: unseen images of the training identities (or ``None``).
        train: ``{"images" (class sizes), "family", "difficulty"}`` per training identity.
    """

    def __init__(self, data_dir: Path, image_size: int) -> None:
        self.data_dir, self.image_size = Path(data_dir), int(image_size)
        meta = json.loads((self.data_dir / "identities.json").read_text())
        if "family" not in meta.get("clustering", {}) or "images" not in meta.get("train", {}):
            raise ValueError(f"{self.data_dir}/identities.json has no family/size ground truth: the study-v2 "
                             "protocol needs a dataset made with the study options (family_size, size_distribution)")
        cl, tr = meta["clustering"], meta["train"]
        self.heldout = {"family": np.asarray(cl["family"]), "difficulty": np.asarray(cl["difficulty"])}
        self.train = {"images": np.asarray(tr["images"]), "family": np.asarray(tr["family"]),
                      "difficulty": np.asarray(tr["difficulty"])}
        self.heldout_images, self.heldout_labels = decode_rec(self.data_dir / "cluster.rec", image_size)
        self.probe_images = self.probe_labels = None
        if (self.data_dir / "probe.rec").is_file():
            self.probe_images, self.probe_labels = decode_rec(self.data_dir / "probe.rec", image_size)
        self._train_images = None

    def train_images(self):
        """``(images [N, 3, S, S] uint8, labels [N])`` of the training set (decoded once)."""
        if self._train_images is None:
            self._train_images = decode_rec(self.data_dir / "train.rec", self.image_size)
        return self._train_images


def make_eval_data(spec: StudySpec, data_dir: Path):
    """The decoded held-out data the spec's protocol evaluates on (:class:`EvalData` or :class:`StudyData`)."""
    if spec.protocol == "study-v2":
        return StudyData(data_dir, spec.image_size)
    return EvalData(data_dir, spec.image_size)

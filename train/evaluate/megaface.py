"""MegaFace challenge 1: FaceScrub probes against 10^k distractors, streamed block by block.

``ROOT`` is the aligned test pack (the insightface layout)::

    facescrub_lst            one probe image path per line, ``<identity>/<file>``
    megaface_lst             one distractor image path per line
    facescrub_images/        the aligned 112x112 probe crops (paths above are relative to it)
    megaface_images/         the aligned distractor crops
    facescrub_noises.txt     optional: probe images to drop (path or file name per line)
    megaface_noises.txt      optional: distractors to drop

The distractor set of size ``N`` is the first ``N`` entries of ``megaface_lst`` that are not on the
noise list (the devkit's 10^k subsets are nested in the same way; a user with the devkit's own
lists can pass one as ``--megaface-distractor-list``).

Metrics, on L2-normalised (flip-fused by default) features and cosine scores:

- **Rank-1 identification** (the devkit's CMC at rank 1): for every ordered pair ``(p, q)`` of
  distinct FaceScrub images of one identity, ``q`` joins the distractors as the one mate of probe
  ``p``; the trial succeeds when ``s(p, q)`` is strictly greater than every ``s(p, d)``. The rate
  is the fraction of successful trials. Only ``max_d s(p, d)`` per probe is needed.
- **Verification TAR at FAR** (1e-6 by default): genuine pairs are the unordered same-identity
  FaceScrub pairs; impostor pairs are every (probe, distractor) pair, ``P x N`` of them (3.5e9 at
  10^6 distractors). TAR is the largest with FAR <= target, computed **exactly**: an impostor score
  matters only if it is among the ``floor(FAR * P * N) + 1`` largest, so those are kept (a few
  thousand at 1e-6) and everything else is only counted in a 2,048-bin histogram (for the figure).

Memory: the probes' features, one block of distractor features and one ``P x block`` score block;
distractor features are never all held.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

__all__ = ["MegaFaceResult", "MegaFaceStream", "evaluate_megaface", "read_image_list", "read_noise_list"]

HIST_BINS = 2048


def read_image_list(path: str | Path, what: str) -> list[str]:
    """Image paths, one per line (blank lines skipped; a path that leaves its folder is an error
    naming file and line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    out = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise ValueError(f"{path}:{n}: not UTF-8 text") from None
            if not line:
                continue
            if line.startswith("/") or ".." in Path(line).parts:
                raise ValueError(f"{path}:{n}: image path {line!r} must be relative to the image folder")
            out.append(line)
    if not out:
        raise ValueError(f"{path} lists no image")
    return out


def read_noise_list(path: Optional[str | Path]) -> set[str]:
    """Paths or file names to drop (``#`` comments and blank lines ignored)."""
    if path is None:
        return set()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"noise list {path} does not exist")
    out = set()
    with open(path, encoding="utf-8", errors="strict") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                out.add(line)
    return out


def _drop(paths: Sequence[str], noise: set[str]) -> list[str]:
    return [p for p in paths if p not in noise and Path(p).name not in noise]


class MegaFaceStream:
    """Accumulates MegaFace metrics over distractor blocks.

    Args:
        probes: ``[P, D]`` L2-normalised probe features.
        labels: ``[P]`` probe identities.
        num_distractors: ``N``, the distractors that will be fed (to size the exact tail).
        fars: Target FARs of the verification figure.
        device: Where the score blocks are computed (``cpu`` or ``cuda``).
    """

    def __init__(self, probes: np.ndarray, labels: np.ndarray, num_distractors: int,
                 fars: Sequence[float] = (1e-6,), device: str = "cpu") -> None:
        import torch

        self.labels = np.asarray(labels)
        p = np.asarray(probes, dtype=np.float32)
        if p.ndim != 2 or p.shape[0] != len(self.labels):
            raise ValueError(f"probes {p.shape} and {len(self.labels)} labels disagree")
        self.device = torch.device(device)
        self.probes = torch.from_numpy(p).to(self.device)
        self.num_distractors = int(num_distractors)
        self.fars = tuple(float(f) for f in fars)
        n_imp = p.shape[0] * self.num_distractors
        self.keep = int(math.floor(max(self.fars) * n_imp)) + 1 if self.fars else 0
        self.max_d = torch.full((p.shape[0],), -math.inf, device=self.device)
        self.tail = torch.empty(0, device=self.device)
        self.hist = np.zeros(HIST_BINS, np.int64)
        self.seen = 0

    def update(self, distractors) -> None:
        """Scores one ``[B, D]`` block of L2-normalised distractor features."""
        import torch

        d = torch.as_tensor(np.asarray(distractors, dtype=np.float32)).to(self.device)
        if d.shape[0] == 0:
            return
        s = self.probes @ d.T  # [P, B]
        self.max_d = torch.maximum(self.max_d, s.max(1).values)
        flat = s.reshape(-1)
        if self.keep:
            if self.tail.numel() >= self.keep:
                flat_c = flat[flat >= self.tail.min()]
            else:
                flat_c = flat
            merged = torch.cat([self.tail, flat_c])
            if merged.numel() > self.keep:
                merged = torch.topk(merged, self.keep, sorted=False).values
            self.tail = merged
        idx = ((flat.clamp(-1, 1) + 1) * (HIST_BINS / 2)).long().clamp_(0, HIST_BINS - 1)
        self.hist += torch.bincount(idx, minlength=HIST_BINS).cpu().numpy()
        self.seen += d.shape[0]

    def result(self) -> "MegaFaceResult":
        """The metrics after all ``num_distractors`` were fed."""
        if self.seen != self.num_distractors:
            raise ValueError(f"fed {self.seen} distractors, expected {self.num_distractors}")
        same = self.labels[:, None] == self.labels[None, :]
        np.fill_diagonal(same, False)
        # float32 on the same device as the distractor blocks, so that s(p, q) and max_d compare alike
        sim = (self.probes @ self.probes.T).double().cpu().numpy()
        max_d = self.max_d.double().cpu().numpy()
        trials = int(same.sum())
        if trials == 0:
            raise ValueError("no FaceScrub identity has two probe images: rank-1 has no trial")
        wins = int((same & (sim > max_d[:, None])).sum())
        iu = np.triu_indices(len(self.labels), 1)
        gen = sim[iu][same[iu]]
        tail = np.sort(self.tail.double().cpu().numpy())[::-1]
        n_imp = len(self.labels) * self.num_distractors
        tar = {}
        for far in self.fars:
            allowed = int(math.floor(far * n_imp))
            if allowed < 1:
                tar[far] = math.nan  # unmeasurable: fewer than 1/FAR impostor pairs
                continue
            thr = tail[allowed] if allowed < len(tail) else -math.inf
            tar[far] = float((gen > thr).mean())
        return MegaFaceResult(num_probes=len(self.labels), num_identities=int(len(np.unique(self.labels))),
                              num_distractors=self.num_distractors, rank1=wins / trials, num_trials=trials,
                              tar_at_far=tar, num_genuine=int(len(gen)), num_impostor=n_imp,
                              impostor_histogram=self.hist.copy())


@dataclass
class MegaFaceResult:
    """MegaFace challenge 1 figures at one distractor count."""

    num_probes: int
    num_identities: int
    num_distractors: int
    rank1: float
    num_trials: int
    tar_at_far: dict
    num_genuine: int
    num_impostor: int
    impostor_histogram: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    noise_dropped: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"num_probes": self.num_probes, "num_identities": self.num_identities,
                "num_distractors": self.num_distractors, "rank1": self.rank1, "num_trials": self.num_trials,
                "tar_at_far": {f"{f:.0e}": (None if math.isnan(v) else v) for f, v in sorted(self.tar_at_far.items())},
                "num_genuine": self.num_genuine, "num_impostor": self.num_impostor,
                "noise_dropped": dict(self.noise_dropped)}


def _features(embedder, root: Path, paths: Sequence[str], *, flip: bool, batch_size: int, workers: int,
              progress: bool, desc: str) -> Iterable[np.ndarray]:
    from .faces import FaceSpec, iter_face_batches

    for batch in iter_face_batches(root, [FaceSpec(p) for p in paths], batch_size=batch_size,
                                   size=embedder.image_size, workers=workers, progress=progress, desc=desc):
        yield embedder.embed(batch, batch_size, flip).numpy()


def evaluate_megaface(
    embedder, root: str | Path, *, num_distractors: int = 1_000_000, distractor_list: Optional[str | Path] = None,
    noise: bool = True, flip: bool = True, fars: Sequence[float] = (1e-6,), batch_size: int = 128,
    block: int = 8192, workers: int = 2, device: str = "cpu", progress: bool = True,
) -> MegaFaceResult:
    """Runs challenge 1 on the aligned test pack at ``root`` (see the module docstring)."""
    from .faces import check_images_exist

    root = Path(root)
    probes = read_image_list(root / "facescrub_lst", "FaceScrub list")
    dis = read_image_list(Path(distractor_list) if distractor_list else root / "megaface_lst", "distractor list")
    dropped = {}
    if noise:
        for name, lst in (("facescrub", probes), ("megaface", dis)):
            f = root / f"{name}_noises.txt"
            if f.is_file():
                kept = _drop(lst, read_noise_list(f))
                dropped[name] = len(lst) - len(kept)
                if name == "facescrub":
                    probes = kept
                else:
                    dis = kept
    if num_distractors < 1:
        raise ValueError(f"--megaface-distractors must be >= 1, got {num_distractors}")
    if len(dis) < num_distractors:
        raise ValueError(f"{num_distractors} distractors asked, the list has {len(dis)} (after dropping noise)")
    dis = dis[:num_distractors]
    labels_txt = []
    for p in probes:
        parts = Path(p).parts
        if len(parts) < 2:
            raise ValueError(f"FaceScrub path {p!r} has no identity folder (<identity>/<file>)")
        labels_txt.append(parts[0])
    _, labels = np.unique(np.asarray(labels_txt), return_inverse=True)
    check_images_exist(root / "facescrub_images", probes, f"{root / 'facescrub_lst'}")
    check_images_exist(root / "megaface_images", dis, "the distractor list")
    pf = np.concatenate(list(_features(embedder, root / "facescrub_images", probes, flip=flip, batch_size=batch_size,
                                       workers=workers, progress=progress, desc="FaceScrub probes")))
    stream = MegaFaceStream(pf, labels, len(dis), fars, device)
    buf, n = [], 0
    for feats in _features(embedder, root / "megaface_images", dis, flip=flip, batch_size=batch_size,
                           workers=workers, progress=progress, desc="MegaFace distractors"):
        buf.append(feats)
        n += len(feats)
        if n >= block:
            stream.update(np.concatenate(buf))
            buf, n = [], 0
    if buf:
        stream.update(np.concatenate(buf))
    res = stream.result()
    res.noise_dropped = dropped
    return res

"""IJB-B / IJB-C 1:1 template verification on the insightface release layout.

``ROOT`` (what users download as ``IJBB/`` or ``IJBC/``) holds::

    loose_crop/<name>                              the images (loose face crops)
    meta/<t>_name_5pts_score.txt                   name x1 y1 x2 y2 x3 y3 x4 y4 x5 y5 score
    meta/<t>_face_tid_mid.txt                      name template_id media_id
    meta/<t>_template_pair_label.txt               template_id_1 template_id_2 label

with ``<t>`` = ``ijbb`` or ``ijbc``. The two image lists describe the same faces line by line (as
the reference script assumes); that is checked here. There are no subject ids: the pair file's
label is the truth.

The published recipe (insightface's IJB evaluation, its "N1 D1 F1" mode), which is the default:

1. align every face to the 112x112 ArcFace template from its 5 landmarks;
2. image feature ``f = net(x) + net(flip(x))`` (flip fusion), **not** normalised ("N1": the norm
   says how good the face is);
3. ``f *= detector score`` ("D1");
4. per template: the mean of each medium's features, summed over the template's media, then
   L2-normalised;
5. score = cosine of the two template features.

Switches: no alignment (faces already aligned), no flip (``F0``), normalise each image (``N0``),
no detector weighting (``D0``), no media pooling (the template is the sum of its images).

TAR at FAR is reported under two rules, both on the same scores: **nearest** (the ROC point whose
FAR is nearest the target, the rule of the reference script and the published tables) and
**at most** (the largest TAR whose FAR does not exceed the target, the stricter one).

Memory: image features ``[N, D]`` (float32), template features ``[T, D]`` (float64), the pair
list (int64), one float64 score per pair and one int64 pair order; pairs are scored by blocks of
templates (:func:`score_template_pairs`).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .verification import FAR_GRID, score_summary, tar_at_far

__all__ = [
    "IJBMeta",
    "IJBResult",
    "IJB_TARGETS",
    "ijb_template_features",
    "read_ijb_meta",
    "score_template_pairs",
    "tar_at_far_nearest",
    "evaluate_ijb",
]

IJB_TARGETS = ("IJBB", "IJBC")


@dataclass
class IJBMeta:
    """The parsed meta files of one target.

    Attributes:
        names: ``[N]`` image names (relative to ``loose_crop/``).
        landmarks: ``[N, 5, 2]`` float64 (x, y) (float32 would move a warp by its rounding).
        faceness: ``[N]`` float64 detector scores.
        templates: ``[N]`` int64 template id of each image.
        medias: ``[N]`` int64 media id of each image.
        pair_t1, pair_t2: ``[P]`` int64 template ids of each pair.
        pair_label: ``[P]`` bool, True = same subject.
    """

    names: list[str]
    landmarks: np.ndarray
    faceness: np.ndarray
    templates: np.ndarray
    medias: np.ndarray
    pair_t1: np.ndarray
    pair_t2: np.ndarray
    pair_label: np.ndarray


def _meta_path(root: Path, target: str, kind: str) -> Path:
    p = root / "meta" / f"{target.lower()}_{kind}.txt"
    if not p.is_file():
        raise FileNotFoundError(f"{p} does not exist (the insightface {target} release has it under meta/)")
    return p


def _text_lines(path: Path):
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{path}:{n}: not UTF-8 text") from None
            cols = line.split()
            if cols:
                yield n, cols


def _read_landmarks(path: Path):
    names, pts, score = [], [], []
    for n, cols in _text_lines(path):
        if len(cols) != 12:
            raise ValueError(f"{path}:{n}: expected 'NAME x1 y1 ... x5 y5 SCORE' (12 columns), got {len(cols)}")
        try:
            vals = [float(c) for c in cols[1:]]
        except ValueError:
            raise ValueError(f"{path}:{n}: landmark or score is not a number: {' '.join(cols[1:])!r}") from None
        if not all(math.isfinite(v) for v in vals):
            raise ValueError(f"{path}:{n}: non-finite landmark or score")
        names.append(cols[0])
        pts.append(vals[:10])
        score.append(vals[10])
    if not names:
        raise ValueError(f"{path} lists no face")
    return names, np.asarray(pts, np.float64).reshape(-1, 5, 2), np.asarray(score, np.float64)


def _read_tid_mid(path: Path):
    names, tid, mid = [], [], []
    for n, cols in _text_lines(path):
        if len(cols) != 3:
            raise ValueError(f"{path}:{n}: expected 'NAME TEMPLATE_ID MEDIA_ID', got {len(cols)} columns")
        try:
            t, m = int(cols[1]), int(cols[2])
        except ValueError:
            raise ValueError(f"{path}:{n}: template and media ids must be integers, got {cols[1]!r} {cols[2]!r}") from None
        names.append(cols[0])
        tid.append(t)
        mid.append(m)
    if not names:
        raise ValueError(f"{path} lists no face")
    return names, np.asarray(tid, np.int64), np.asarray(mid, np.int64)


def _read_int_table(path: Path, ncols: int, what: str, chunk_lines: int = 1 << 20) -> np.ndarray:
    """``[rows, ncols]`` int64 of a whitespace-separated integer file, parsed a chunk at a time
    (fast path: one ``numpy`` conversion per chunk; on any irregularity the chunk is re-read line
    by line so the error names the line)."""
    parts, first_line = [], 1
    with open(path, "rb") as f:
        while True:
            lines = list(itertools.islice(f, chunk_lines))
            if not lines:
                break
            tokens = b" ".join(lines).split()
            arr = None
            if len(tokens) == ncols * len(lines):
                try:
                    arr = np.array(tokens).astype(np.int64).reshape(-1, ncols)
                except ValueError:
                    arr = None
            if arr is None:  # slow path: blank lines are allowed, anything else is an error
                rows = []
                for k, raw in enumerate(lines):
                    cols = raw.split()
                    if not cols:
                        continue
                    n = first_line + k
                    if len(cols) != ncols:
                        raise ValueError(f"{path}:{n}: expected {what} ({ncols} columns), got {len(cols)}")
                    try:
                        rows.append([int(c) for c in cols])
                    except ValueError:
                        raise ValueError(f"{path}:{n}: expected {what}, got {raw.decode('utf-8', 'replace').strip()!r}") from None
                arr = np.asarray(rows, np.int64).reshape(-1, ncols)
            parts.append(arr)
            first_line += len(lines)
    out = np.concatenate(parts) if parts else np.zeros((0, ncols), np.int64)
    if not len(out):
        raise ValueError(f"{path} lists no {what.split()[0]}")
    return out


def read_ijb_meta(root: str | Path, target: str) -> IJBMeta:
    """Reads and cross-checks the three meta files of ``target`` (``IJBB`` or ``IJBC``).

    Raises:
        FileNotFoundError: A meta file is missing.
        ValueError: A malformed line (file and line named), image lists that disagree, a pair label
            other than 0/1, or a pair naming a template no image belongs to.
    """
    root = Path(root)
    target = target.upper()
    if target not in IJB_TARGETS:
        raise ValueError(f"IJB target must be one of {IJB_TARGETS}, got {target!r}")
    lm_path = _meta_path(root, target, "name_5pts_score")
    tm_path = _meta_path(root, target, "face_tid_mid")
    pr_path = _meta_path(root, target, "template_pair_label")
    names, pts, score = _read_landmarks(lm_path)
    names2, tid, mid = _read_tid_mid(tm_path)
    if len(names) != len(names2):
        raise ValueError(f"{lm_path} lists {len(names)} faces but {tm_path} lists {len(names2)}; they describe the "
                         "same faces line by line")
    if names != names2:
        i = next(k for k, (a, b) in enumerate(zip(names, names2)) if a != b)
        raise ValueError(f"face {i + 1} is {names[i]!r} in {lm_path} but {names2[i]!r} in {tm_path}; the two lists "
                         "describe the same faces line by line")
    pairs = _read_int_table(pr_path, 3, "'TEMPLATE_ID_1 TEMPLATE_ID_2 LABEL'")
    bad = np.nonzero((pairs[:, 2] != 0) & (pairs[:, 2] != 1))[0]
    if len(bad):
        raise ValueError(f"{pr_path}: pair {bad[0] + 1} has label {pairs[bad[0], 2]}; labels are 0 or 1")
    known = np.unique(tid)
    for col in (0, 1):
        missing = ~np.isin(pairs[:, col], known)
        if missing.any():
            k = int(np.argmax(missing))
            raise ValueError(f"{pr_path}: pair {k + 1} names template {pairs[k, col]}, which no face in {tm_path} "
                             "belongs to")
    return IJBMeta(names=names, landmarks=pts, faceness=score, templates=tid, medias=mid,
                   pair_t1=pairs[:, 0].copy(), pair_t2=pairs[:, 1].copy(), pair_label=pairs[:, 2] == 1)


def ijb_template_features(
    image_features: np.ndarray, faceness: np.ndarray, templates: np.ndarray, medias: np.ndarray, *,
    raw_norm: bool = True, detector_score: bool = True, media_pooling: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Template features by the published recipe (see the module docstring).

    Args:
        image_features: ``[N, D]`` raw (flip-fused) image features.
        faceness: ``[N]`` detector scores.
        templates: ``[N]`` template id of each image.
        medias: ``[N]`` media id of each image.
        raw_norm: Keep each image feature's norm (``False``: normalise each first).
        detector_score: Multiply each image feature by its detector score.
        media_pooling: Average each medium's images before summing (``False``: sum the images).

    Returns:
        ``(template_ids [T] sorted int64, features [T, D] float64 L2-normalised)``.
    """
    f = np.asarray(image_features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] != len(templates) or len(templates) != len(medias) or len(faceness) != len(medias):
        raise ValueError(f"features {f.shape}, {len(faceness)} scores, {len(templates)} templates and "
                         f"{len(medias)} media ids must describe the same images")
    if not np.isfinite(f).all():
        raise ValueError("non-finite image features: the model produced NaN/inf embeddings")
    if not raw_norm:
        norm = np.linalg.norm(f, axis=1, keepdims=True)
        f = f / np.where(norm > 0, norm, 1.0)
    if detector_score:
        f = f * np.asarray(faceness, dtype=np.float64)[:, None]
    t = np.asarray(templates, dtype=np.int64)
    m = np.asarray(medias, dtype=np.int64) if media_pooling else np.arange(len(t), dtype=np.int64)
    # Group rows by (template, media): sort once, then segment sums with reduceat.
    order = np.lexsort((m, t))
    ts, ms, fs = t[order], m[order], f[order]
    new = np.ones(len(ts), dtype=bool)
    new[1:] = (ts[1:] != ts[:-1]) | (ms[1:] != ms[:-1])
    starts = np.nonzero(new)[0]
    media_sum = np.add.reduceat(fs, starts, axis=0)
    media_mean = media_sum / np.diff(np.append(starts, len(ts)))[:, None]
    media_t = ts[starts]
    tstart = np.nonzero(np.r_[True, media_t[1:] != media_t[:-1]])[0]
    feats = np.add.reduceat(media_mean, tstart, axis=0)
    norm = np.linalg.norm(feats, axis=1, keepdims=True)
    if (norm == 0).any():
        k = int(np.argmin(norm[:, 0]))
        raise ValueError(f"template {media_t[tstart][k]} has a zero feature (every detector score 0?)")
    return media_t[tstart], feats / norm


def score_template_pairs(
    template_ids: np.ndarray, template_features: np.ndarray, t1: np.ndarray, t2: np.ndarray, *,
    block_bytes: int = 1 << 28, device: str = "cpu", progress: bool = False,
) -> np.ndarray:
    """``[P]`` float64 cosine scores of template pairs.

    Pairs are grouped by their first template; for each block of first templates, one matrix
    product with every template (``rows x T`` float64, at most ``block_bytes``) gives all their
    scores, and each pair picks its entry. A matrix product runs at BLAS speed, where gathering
    two feature rows per pair is memory-bound (20-60x slower measured on this project's CPU VM).
    Extra memory: the block and one int64 order of the pairs.

    ``template_ids`` must be sorted (as :func:`ijb_template_features` returns them); every id in
    ``t1``/``t2`` must be among them.
    """
    import torch

    i1 = np.searchsorted(template_ids, t1)
    i2 = np.searchsorted(template_ids, t2)
    for ids, idx in ((t1, i1), (t2, i2)):
        idx_c = np.minimum(idx, len(template_ids) - 1)
        bad = template_ids[idx_c] != ids
        if bad.any():
            raise ValueError(f"pair {int(np.argmax(bad)) + 1} names template {ids[np.argmax(bad)]}, which has no image")
    dev = torch.device(device)
    feats = torch.from_numpy(np.ascontiguousarray(template_features, dtype=np.float64)).to(dev)
    n_t = feats.shape[0]
    rows = max(1, int(block_bytes // (8 * max(n_t, 1))))
    order = np.argsort(i1, kind="stable")
    starts = np.searchsorted(i1[order], np.arange(0, n_t + rows, rows))
    out = np.empty(len(t1), dtype=np.float64)
    blocks = range(0, n_t, rows)
    if progress:
        from tqdm import tqdm

        blocks = tqdm(blocks, desc="pairs", unit="block", mininterval=2.0)
    for b, r0 in enumerate(blocks):
        lo, hi = starts[b], starts[b + 1]
        if lo == hi:
            continue
        sel = order[lo:hi]
        sims = feats[r0 : r0 + rows] @ feats.T  # [rows, T]
        a = torch.from_numpy(i1[sel] - r0).to(dev)
        c = torch.from_numpy(i2[sel]).to(dev)
        out[sel] = sims[a, c].cpu().numpy()
    return out


def tar_at_far_nearest(scores: np.ndarray, issame: np.ndarray, fars: Sequence[float]) -> dict[float, float]:
    """TAR at the ROC point whose FAR is nearest each target: the rule of the reference script and
    the published tables, reproduced exactly, i.e. on scikit-learn's ``roc_curve`` with its
    defaults (it starts at (0, 0) and drops collinear intermediate points) and ``argmin``'s first
    point on ties. Both details change the figure on small pair sets (docs/evaluation.md)."""
    from sklearn.metrics import roc_curve as sk_roc_curve

    scores = np.asarray(scores, dtype=np.float64).ravel()
    issame = np.asarray(issame, dtype=bool).ravel()
    if scores.shape != issame.shape or not scores.size:
        raise ValueError(f"{scores.size} scores for {issame.size} labels")
    far_c, tar_c, _ = sk_roc_curve(issame, scores)
    return {float(f): float(tar_c[int(np.argmin(np.abs(far_c - f)))]) for f in fars}


@dataclass
class IJBResult:
    """1:1 verification figures of one IJB target."""

    target: str
    num_images: int
    num_templates: int
    num_pairs: int
    tar_nearest: dict[float, float]
    tar_at_most: dict[float, float]
    settings: dict
    scores_summary: dict
    scores_file: Optional[str] = None
    pair_scores: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    issame: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, bool))

    def to_dict(self) -> dict:
        key = lambda f: f"{f:.0e}"  # noqa: E731
        return {
            "target": self.target, "num_images": self.num_images, "num_templates": self.num_templates,
            "num_pairs": self.num_pairs,
            "tar_at_far_nearest": {key(f): v for f, v in sorted(self.tar_nearest.items())},
            "tar_at_far_at_most": {key(f): (None if math.isnan(v) else v) for f, v in sorted(self.tar_at_most.items())},
            "settings": dict(self.settings), **self.scores_summary, "scores_file": self.scores_file,
        }


def summarize_ijb(target: str, scores: np.ndarray, issame: np.ndarray, num_images: int, num_templates: int,
                  settings: dict, fars: Sequence[float] = FAR_GRID) -> IJBResult:
    """Both TAR@FAR rules and the score statistics of scored pairs."""
    summ = score_summary(scores, issame)
    if summ.num_pos == 0 or summ.num_neg == 0:
        raise ValueError(f"{target}: the pair file needs both genuine (1) and impostor (0) pairs")
    return IJBResult(
        target=target, num_images=num_images, num_templates=num_templates, num_pairs=int(len(scores)),
        tar_nearest=tar_at_far_nearest(scores, issame, fars), tar_at_most=tar_at_far(scores, issame, fars),
        settings=settings,
        scores_summary={"num_pos": summ.num_pos, "num_neg": summ.num_neg, "pos_mean": summ.pos_mean,
                        "neg_mean": summ.neg_mean, "gap": summ.gap},
        pair_scores=scores, issame=issame)


def evaluate_ijb(
    embedder, root: str | Path, target: str, *, align: bool = True, flip: bool = True, raw_norm: bool = True,
    detector_score: bool = True, media_pooling: bool = True, batch_size: int = 128, workers: int = 2,
    device: str = "cpu", progress: bool = True, save_scores: Optional[str | Path] = None,
    fars: Sequence[float] = FAR_GRID,
) -> IJBResult:
    """Runs the whole 1:1 protocol on an insightface-layout ``root`` (see the module docstring).

    Args:
        embedder: A :class:`train.evaluate.embedders.Embedder`.
        root: The release folder (``loose_crop/`` and ``meta/``).
        target: ``IJBB`` or ``IJBC``.
        align, flip, raw_norm, detector_score, media_pooling: The recipe's steps (all on = published).
        batch_size: Images per model batch.
        workers: Decoding processes.
        device: Where pair scoring runs (``cpu`` or ``cuda``).
        progress: tqdm bars on stderr.
        save_scores: Folder to write ``ijb_<target>_scores.npy`` into (pair-file order), or ``None``.
        fars: Target FARs.
    """
    from .faces import FaceSpec, check_images_exist, iter_face_batches

    root = Path(root)
    target = target.upper()
    meta = read_ijb_meta(root, target)
    images = root / "loose_crop"
    if not images.is_dir():
        raise FileNotFoundError(f"{images} does not exist (the insightface {target} release has it)")
    check_images_exist(images, meta.names, f"{root / 'meta'}/{target.lower()}_name_5pts_score.txt")
    specs = [FaceSpec(n, landmarks=meta.landmarks[i] if align else None) for i, n in enumerate(meta.names)]
    feats = None
    pos = 0
    for batch in iter_face_batches(images, specs, batch_size=batch_size, size=embedder.image_size, workers=workers,
                                   progress=progress, desc=f"{target} images"):
        e = embedder.embed(batch, batch_size, flip, normalize=False).numpy()
        if feats is None:  # sized by the model's real output
            feats = np.empty((len(specs), e.shape[1]), dtype=np.float32)
        feats[pos : pos + len(e)] = e
        pos += len(e)
    tids, tfeats = ijb_template_features(feats, meta.faceness, meta.templates, meta.medias, raw_norm=raw_norm,
                                         detector_score=detector_score, media_pooling=media_pooling)
    scores = score_template_pairs(tids, tfeats, meta.pair_t1, meta.pair_t2, device=device, progress=progress)
    settings = {"align": align, "flip": flip, "raw_norm": raw_norm, "detector_score": detector_score,
                "media_pooling": media_pooling,
                "mode": f"N{int(raw_norm)} D{int(detector_score)} F{int(flip)}"}
    res = summarize_ijb(target, scores, meta.pair_label, len(specs), len(tids), settings, fars)
    if save_scores is not None:
        out = Path(save_scores)
        out.mkdir(parents=True, exist_ok=True)
        f = out / f"ijb_{target.lower()}_scores.npy"
        np.save(f, scores)
        res.scores_file = f.name
    return res

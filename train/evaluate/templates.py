"""IJB-B/C style 1:1 template verification: per-template feature aggregation and TAR at FAR.

A *template* is a set of images of one subject (stills and video frames). Its feature is the mean of
its images' L2-normalised features, normalised again; with *media pooling* the images of one medium
(one video, or one still) are averaged first and the template is the mean of its media, so a long
video does not outweigh a single photograph. Two templates are compared by the cosine of their
features.

File formats (plain text, whitespace-separated, ``#`` starts a comment, blank lines ignored):

``templates.txt`` -- one line per (template, image)::

    TEMPLATE_ID IMAGE SUBJECT_LABEL [MEDIA_ID]

``TEMPLATE_ID`` and ``MEDIA_ID`` are any tokens; ``SUBJECT_LABEL`` is an integer; ``IMAGE`` names an
image in the image source (a 0-based image position in a ``.rec`` file, or a path relative to an
image directory). Every line of one template must carry the same subject. ``MEDIA_ID`` is needed
only for media pooling (a line without it is its own medium).

``template_pairs.txt`` -- one line per comparison::

    TEMPLATE_ID_1 TEMPLATE_ID_2 LABEL

with ``LABEL`` 1 for a genuine (same subject) and 0 for an impostor pair; it must agree with the
subjects of the two templates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .verification import ScoreSummary, measurable_fars, score_summary, tar_at_far

__all__ = [
    "TEMPLATE_FARS",
    "TemplateList",
    "TemplatePairs",
    "TemplateResult",
    "aggregate_templates",
    "evaluate_templates",
    "make_synthetic_template_protocol",
    "read_template_list",
    "read_template_pairs",
    "template_pair_scores",
]

#: The FARs of the IJB-B/C 1:1 protocol.
TEMPLATE_FARS: tuple[float, ...] = (1e-5, 1e-4, 1e-3)


@dataclass(frozen=True)
class TemplateList:
    """Parsed ``templates.txt``: ``M`` (template, image) entries over ``T`` templates.

    Attributes:
        template_ids: ``[T]`` template tokens in first-seen order.
        template_index: ``[M]`` int64 index into ``template_ids`` of each entry.
        images: ``[M]`` image tokens.
        subject: ``[T]`` int64 subject label of each template.
        media_index: ``[M]`` int64 global medium index per entry (entries without a medium get
            their own), or ``None`` when no line names a medium.
    """

    template_ids: list[str]
    template_index: np.ndarray
    images: list[str]
    subject: np.ndarray
    media_index: Optional[np.ndarray]

    @property
    def num_templates(self) -> int:
        return len(self.template_ids)


@dataclass(frozen=True)
class TemplatePairs:
    """Parsed ``template_pairs.txt``: ``[P]`` template indices of both sides and ``issame``."""

    first: np.ndarray
    second: np.ndarray
    issame: np.ndarray


def _lines(path: Path, what: str):
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist")
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.split("#", 1)[0].strip()
            if line:
                yield n, line.split()


def read_template_list(path: str | Path) -> TemplateList:
    """Reads ``templates.txt`` (see the module docstring).

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: A malformed line, a non-integer label, a template with two subjects, or no
            entries; the message names the file and line.
    """
    path = Path(path)
    tid_of: dict[str, int] = {}
    subject: list[int] = []
    t_index, images, media_tokens = [], [], []
    any_media = False
    for n, cols in _lines(path, "template list"):
        if len(cols) not in (3, 4):
            raise ValueError(f"{path}:{n}: expected 'TEMPLATE IMAGE LABEL [MEDIA]', got {len(cols)} columns")
        try:
            label = int(cols[2])
        except ValueError:
            raise ValueError(f"{path}:{n}: subject label {cols[2]!r} is not an integer") from None
        t = tid_of.setdefault(cols[0], len(tid_of))
        if t == len(subject):
            subject.append(label)
        elif subject[t] != label:
            raise ValueError(f"{path}:{n}: template {cols[0]!r} has subject {subject[t]} on an earlier line and "
                             f"{label} here; a template holds one subject")
        t_index.append(t)
        images.append(cols[1])
        media_tokens.append(cols[3] if len(cols) == 4 else None)
        any_media |= len(cols) == 4
    if not images:
        raise ValueError(f"{path} has no template entries")
    media = None
    if any_media:
        # Media ids are scoped to their template: the same token in two templates is two media.
        ids: dict[tuple, int] = {}
        media = np.array([ids.setdefault((t, m) if m is not None else (t, None, i), len(ids))
                          for i, (t, m) in enumerate(zip(t_index, media_tokens))], dtype=np.int64)
    return TemplateList(template_ids=list(tid_of), template_index=np.asarray(t_index, dtype=np.int64),
                        images=images, subject=np.asarray(subject, dtype=np.int64), media_index=media)


def read_template_pairs(path: str | Path, templates: TemplateList) -> TemplatePairs:
    """Reads ``template_pairs.txt`` against a parsed template list.

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: A malformed line, an unknown template, a label other than 0/1, a label that
            contradicts the templates' subjects, or no pairs.
    """
    path = Path(path)
    index = {t: i for i, t in enumerate(templates.template_ids)}
    first, second, same = [], [], []
    for n, cols in _lines(path, "template pair"):
        if len(cols) != 3:
            raise ValueError(f"{path}:{n}: expected 'TEMPLATE1 TEMPLATE2 LABEL', got {len(cols)} columns")
        for t in cols[:2]:
            if t not in index:
                raise ValueError(f"{path}:{n}: template {t!r} is not in the template list")
        if cols[2] not in ("0", "1"):
            raise ValueError(f"{path}:{n}: pair label must be 0 or 1, got {cols[2]!r}")
        a, b, y = index[cols[0]], index[cols[1]], cols[2] == "1"
        if (templates.subject[a] == templates.subject[b]) != y:
            raise ValueError(f"{path}:{n}: label {cols[2]} but the templates' subjects are "
                             f"{int(templates.subject[a])} and {int(templates.subject[b])}")
        first.append(a)
        second.append(b)
        same.append(y)
    if not first:
        raise ValueError(f"{path} has no template pairs")
    return TemplatePairs(np.asarray(first, dtype=np.int64), np.asarray(second, dtype=np.int64),
                         np.asarray(same, dtype=bool))


def _group_mean(x: np.ndarray, group: np.ndarray, num_groups: int) -> np.ndarray:
    """Row means of ``x [M, D]`` per group id in ``[0, num_groups)``."""
    out = np.zeros((num_groups, x.shape[1]), dtype=np.float64)
    np.add.at(out, group, x)
    counts = np.bincount(group, minlength=num_groups).astype(np.float64)
    if (counts == 0).any():
        raise ValueError(f"group {int(np.argmin(counts))} has no entries")
    return out / counts[:, None]


def _normalize(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    if (norm == 0).any() or not np.isfinite(norm).all():
        raise ValueError("zero or non-finite feature: the model produced a degenerate embedding")
    return x / norm


def aggregate_templates(
    features: np.ndarray, template_index: np.ndarray, num_templates: int,
    media_index: Optional[np.ndarray] = None,
) -> np.ndarray:
    """Template features from image features.

    Args:
        features: ``[M, D]`` feature of each (template, image) entry (any scale; normalised here).
        template_index: ``[M]`` template of each entry, in ``[0, num_templates)``.
        num_templates: ``T``; every template needs at least one entry.
        media_index: Optional ``[M]`` medium of each entry (media never span templates). When
            given, entries are averaged per medium first and the template is the mean of its media.

    Returns:
        ``[T, D]`` float64 L2-normalised template features.
    """
    f = _normalize(np.asarray(features, dtype=np.float64))
    t = np.asarray(template_index, dtype=np.int64)
    if f.shape[0] != t.shape[0]:
        raise ValueError(f"{f.shape[0]} features for {t.shape[0]} template entries")
    if media_index is not None:
        m = np.asarray(media_index, dtype=np.int64)
        if m.shape != t.shape:
            raise ValueError(f"media_index has {m.shape[0]} entries, template_index {t.shape[0]}")
        _, m = np.unique(m, return_inverse=True)
        num_media = int(m.max()) + 1
        owner = np.full(num_media, -1, dtype=np.int64)
        owner[m] = t
        if (owner[m] != t).any():
            raise ValueError("a medium appears in two templates; media ids must be per template")
        f = _group_mean(f, m, num_media)
        t = owner
    return _normalize(_group_mean(f, t, num_templates))


def template_pair_scores(template_features: np.ndarray, pairs: TemplatePairs) -> np.ndarray:
    """``[P]`` cosine similarity of each template pair (features ``[T, D]``, normalised)."""
    return (template_features[pairs.first] * template_features[pairs.second]).sum(1)


@dataclass
class TemplateResult:
    """1:1 template verification figures.

    Attributes:
        tar: TAR at each measurable FAR.
        omitted_fars: Target FARs the impostor-pair count cannot measure.
        scores: Genuine/impostor score statistics.
        num_templates: Templates in the list.
        num_pairs: Compared pairs.
        media_pooling: Whether media were pooled.
        pair_scores: ``[P]`` scores (for figures; not serialised).
        issame: ``[P]`` ground truth (for figures; not serialised).
    """

    tar: dict[float, float]
    omitted_fars: list[float]
    scores: ScoreSummary
    num_templates: int
    num_pairs: int
    media_pooling: bool
    pair_scores: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    issame: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, bool))

    def to_dict(self) -> dict:
        s = self.scores
        return {
            "tar_at_far": {f"{far:.0e}": v for far, v in sorted(self.tar.items())},
            "omitted_fars": [f"{far:.0e}" for far in self.omitted_fars],
            "num_templates": self.num_templates, "num_pairs": self.num_pairs,
            "num_pos": s.num_pos, "num_neg": s.num_neg, "media_pooling": self.media_pooling,
            "pos_mean": s.pos_mean, "neg_mean": s.neg_mean, "gap": s.gap,
            "pos_std": s.pos_std, "neg_std": s.neg_std,
        }


def evaluate_templates(
    features: np.ndarray, templates: TemplateList, pairs: TemplatePairs, *,
    fars: Sequence[float] = TEMPLATE_FARS, media_pooling: bool = False,
) -> TemplateResult:
    """1:1 verification of template pairs.

    Args:
        features: ``[M, D]`` feature of each entry of ``templates`` (entry order).
        templates: The parsed template list.
        pairs: The parsed pairs.
        fars: Target FARs (default 1e-5, 1e-4, 1e-3); those with fewer than ``1 / FAR``
            impostor pairs are omitted.
        media_pooling: Pool per medium first (needs media ids in the list).

    Returns:
        The :class:`TemplateResult`.
    """
    if media_pooling and templates.media_index is None:
        raise ValueError("media pooling needs a MEDIA_ID column in the template list")
    feats = aggregate_templates(features, templates.template_index, templates.num_templates,
                                templates.media_index if media_pooling else None)
    scores = template_pair_scores(feats, pairs)
    summ = score_summary(scores, pairs.issame)
    if summ.num_pos == 0 or summ.num_neg == 0:
        raise ValueError("template pairs need both genuine (1) and impostor (0) pairs")
    kept, omitted = measurable_fars(summ.num_neg, fars)
    tar = tar_at_far(scores, pairs.issame, kept) if kept else {}
    assert not any(math.isnan(v) for v in tar.values())
    return TemplateResult(tar=tar, omitted_fars=omitted, scores=summ, num_templates=templates.num_templates,
                          num_pairs=len(scores), media_pooling=media_pooling, pair_scores=scores,
                          issame=pairs.issame)


def make_synthetic_template_protocol(
    labels: np.ndarray, out_dir: str | Path, *, templates_per_identity: int = 4, max_media_size: int = 3,
    max_impostor_pairs: int = 200_000, seed: int = 0,
) -> tuple[Path, Path]:
    """Writes an IJB-style template protocol over a labelled image set (e.g. the synthetic
    dataset's ``cluster.rec``), so template verification runs without downloads.

    Each identity's images are shuffled and cut into ``templates_per_identity`` templates of
    random, non-empty sizes; inside a template, consecutive images are grouped into media of 1 to
    ``max_media_size`` images (stand-ins for video frames). Pairs: every genuine pair (two
    templates of one identity) and every impostor pair, or a uniform sample of
    ``max_impostor_pairs`` of them when there are more.

    Args:
        labels: ``[N]`` identity of each image; the IMAGE column is the 0-based image position.
        out_dir: Where ``templates.txt`` and ``template_pairs.txt`` go (created).
        templates_per_identity: Templates per identity (identities with fewer images get one
            template per image).
        max_media_size: Largest medium.
        max_impostor_pairs: Cap on impostor pairs.
        seed: Seed of the cuts and of the impostor sample.

    Returns:
        ``(templates_path, pairs_path)``.
    """
    labels = np.asarray(labels, dtype=np.int64).ravel()
    if templates_per_identity < 2:
        raise ValueError("templates_per_identity must be >= 2 (genuine pairs need two templates)")
    if max_media_size < 1:
        raise ValueError("max_media_size must be >= 1")
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines, owner = [], []  # owner[t] = identity of template t
    for ident in np.unique(labels):
        imgs = rng.permutation(np.nonzero(labels == ident)[0])
        k = min(templates_per_identity, len(imgs))
        if k < 2:
            continue  # a single image cannot form a genuine pair; leave the identity out
        cuts = np.sort(rng.choice(np.arange(1, len(imgs)), k - 1, replace=False))
        for part in np.split(imgs, cuts):
            t = len(owner)
            owner.append(int(ident))
            pos, medium = 0, 0
            while pos < len(part):
                size = int(rng.integers(1, max_media_size + 1))
                for i in part[pos : pos + size]:
                    lines.append(f"t{t} {int(i)} {int(ident)} m{medium}")
                pos += size
                medium += 1
    if len(set(owner)) < 2:
        raise ValueError("need at least two identities with two or more images each")
    owner_a = np.asarray(owner)
    a, b = np.triu_indices(len(owner_a), k=1)
    same = owner_a[a] == owner_a[b]
    imp = np.nonzero(~same)[0]
    if len(imp) > max_impostor_pairs:
        imp = np.sort(rng.choice(imp, max_impostor_pairs, replace=False))
    keep = np.sort(np.concatenate([np.nonzero(same)[0], imp]))
    t_path, p_path = out / "templates.txt", out / "template_pairs.txt"
    header = "# synthetic IJB-style protocol: TEMPLATE IMAGE(position in the .rec) SUBJECT MEDIA\n"
    t_path.write_text(header + "\n".join(lines) + "\n")
    p_path.write_text("# TEMPLATE1 TEMPLATE2 LABEL(1 genuine, 0 impostor)\n"
                      + "".join(f"t{a[i]} t{b[i]} {int(same[i])}\n" for i in keep))
    return t_path, p_path

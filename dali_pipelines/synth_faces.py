"""Deterministic synthetic face-identity dataset (the ``synth`` command).

Each identity is a procedural face: a skin-coloured ellipse with hair, eyes
(sclera, iris, pupil), brows, nose, mouth, optional glasses and an
identity-specific skin texture, all with identity-specific geometry and
colours. Each image re-renders the face under

* an expression jitter of the geometry,
* a pose-like affine warp (rotation, scale, shift, horizontal squeeze for yaw),
  applied to the sampling grid so there is no resampling blur,
* illumination (gain, directional gradient, colour cast),
* an occlusion patch, Gaussian blur and sensor noise,

all scaled by the identity's **difficulty** ``d`` in ``[0, 1]``: low-``d``
identities cluster tightly, high-``d`` ones loosely (and are easier to confuse).
Everything is a function of ``(seed, identity number, image number)`` so the
output does not depend on the number of worker processes.

Outputs (in ``out_dir``):

* ``train.rec`` / ``train.idx`` - insightface layout, training identities;
* ``verification.bin`` - LFW-layout pairs of disjoint identities;
* ``cluster.rec`` / ``cluster.idx`` + ``cluster_labels.npy`` - labelled
  held-out identities (disjoint from both) for clustering evaluation;
* ``identities.json`` - difficulty of every identity of every split, the
  verification pairs' identities and pair difficulty;
* ``identities.csv`` - the ground truth per identity, one row each: split, global id, label in
  its split, family (``-1`` = none), image count, difficulty (the nuisance level).

Study options (all off by default; with the defaults the files above are byte-identical to
those of earlier versions):

* **look-alike families** (``family_size > 1``): consecutive identities of a split are grouped
  in blocks of ``family_size``; a block is a family with probability ``family_fraction``. A
  member's geometry and colours are ``family + (1 - family_share) * (own - family)``: they share
  ``family_share`` of their generative parameters (glasses too) and are hard to tell apart. The
  difficulty (nuisance level) stays the member's own, so family and nuisance are independent.
* **long-tailed class sizes** (``size_distribution = "powerlaw"``): training identity ``i``
  gets ``n_i`` images from a truncated power law ``p(n) ~ n^-size_exponent`` on
  ``[images_min, images_max]`` (exponent 1: log-uniform), at stratified quantiles in a seeded
  random order, so the size distribution is exact and independent of family and difficulty.
* **probe images** (``probe_images_per_identity > 0``): ``probe.rec`` + ``probe_labels.npy``,
  further images of the *training* identities (image numbers after their training images) with
  training labels: per-class evaluation by class size.
"""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .dataset import InsightFaceWriter
from .verification_bin import write_verification_bin


@dataclass
class SynthConfig:
    """Sizes of the synthetic dataset.

    Attributes:
        train_identities: Identities in ``train.rec``.
        images_per_identity: Images per training identity.
        ver_identities: Identities used for verification pairs.
        ver_images_per_identity: Images rendered per verification identity.
        ver_pairs: Pairs in ``verification.bin`` (half positive).
        cluster_identities: Identities in the clustering set.
        cluster_images_per_identity: Images per clustering identity.
        image_size: Side of the square images.
        seed: Master seed.
        jpeg_quality: JPEG quality.
        difficulty_range: Identity difficulties are uniform in this range.
        family_size: Identities per look-alike family block (1 = no families).
        family_fraction: Probability that a block is a family (else its members are unrelated).
        family_share: Fraction of the generative parameters family members share, in [0, 1].
        size_distribution: ``"fixed"`` (``images_per_identity`` each) or ``"powerlaw"``.
        images_min, images_max: Range of the power-law training class sizes.
        size_exponent: Exponent ``a`` of ``p(n) ~ n^-a`` (1 = log-uniform).
        probe_images_per_identity: Extra images per training identity in ``probe.rec``.
    """

    train_identities: int = 500
    images_per_identity: int = 40
    ver_identities: int = 100
    ver_images_per_identity: int = 10
    ver_pairs: int = 1000
    cluster_identities: int = 50
    cluster_images_per_identity: int = 20
    image_size: int = 112
    seed: int = 0
    jpeg_quality: int = 90
    difficulty_range: tuple[float, float] = field(default=(0.0, 1.0))
    family_size: int = 1
    family_fraction: float = 0.5
    family_share: float = 0.8
    size_distribution: str = "fixed"
    images_min: int = 2
    images_max: int = 200
    size_exponent: float = 1.0
    probe_images_per_identity: int = 0

    def __post_init__(self) -> None:
        def bad(key: str, msg: str) -> None:
            raise ValueError(f"synth config: {key} {msg}")

        if self.family_size < 1:
            bad("family_size", f"must be >= 1, got {self.family_size}")
        if not 0.0 <= self.family_fraction <= 1.0:
            bad("family_fraction", f"must be in [0, 1], got {self.family_fraction}")
        if not 0.0 <= self.family_share <= 1.0:
            bad("family_share", f"must be in [0, 1], got {self.family_share}")
        if self.size_distribution not in SIZE_DISTRIBUTIONS:
            bad("size_distribution", f"must be one of {SIZE_DISTRIBUTIONS}, got {self.size_distribution!r}")
        if not 1 <= self.images_min <= self.images_max:
            bad("images_min/images_max", f"must satisfy 1 <= min <= max, got {self.images_min}, {self.images_max}")
        if self.size_exponent < 0:
            bad("size_exponent", f"must be >= 0, got {self.size_exponent}")
        if self.probe_images_per_identity < 0:
            bad("probe_images_per_identity", f"must be >= 0, got {self.probe_images_per_identity}")
        if self.image_size < 16:
            bad("image_size", f"must be >= 16, got {self.image_size}")

    def record(self) -> dict[str, Any]:
        """The config as ``identities.json`` stores it: the study options only when not default.

        Datasets made with the defaults keep the exact record (and bytes) of earlier versions.
        """
        d = json.loads(json.dumps(asdict(self)))
        for f in STUDY_OPTIONS:
            if d[f] == _STUDY_DEFAULTS[f]:
                d.pop(f)
        return d

    @property
    def study_options(self) -> bool:
        """Whether any study option (families, power-law sizes, probe images) is on."""
        return self.family_size > 1 or self.size_distribution != "fixed" or self.probe_images_per_identity > 0

    def class_sizes(self) -> list[int]:
        """Images per training identity, in label order."""
        n = self.train_identities
        if self.size_distribution == "fixed":
            return [self.images_per_identity] * n
        return power_law_sizes(n, self.images_min, self.images_max, self.size_exponent, self.seed)


SIZE_DISTRIBUTIONS = ("fixed", "powerlaw")
#: The test bed's options of :class:`SynthConfig` (families, class sizes, probes). The recipe's
#: ``[data.synth]`` and ``pfc ablate``'s ``StudySpec`` carry the same keys with the same defaults.
STUDY_OPTIONS = ("family_size", "family_fraction", "family_share", "size_distribution", "images_min",
                 "images_max", "size_exponent", "probe_images_per_identity")
_STUDY_DEFAULTS = {f: getattr(SynthConfig, f) for f in STUDY_OPTIONS}


def power_law_sizes(n: int, lo: int, hi: int, exponent: float, seed: int) -> list[int]:
    """``n`` class sizes from a truncated power law ``p(x) ~ x^-exponent`` on ``[lo, hi]``.

    The sizes are the distribution's quantiles at ``(j + 0.5) / n`` (stratified: the empirical
    distribution matches the law with no sampling noise), assigned to identities in a random
    order drawn from ``seed`` (independent of every other property of an identity).

    Returns:
        ``n`` ints in ``[lo, hi]``.
    """
    u = (np.random.default_rng([seed, 5]).permutation(n) + 0.5) / n
    a = float(exponent)
    if abs(a - 1.0) < 1e-12:
        x = lo * (hi / lo) ** u
    else:
        e = 1.0 - a
        x = (lo**e + u * (hi**e - lo**e)) ** (1.0 / e)
    return [int(v) for v in np.clip(np.rint(x), lo, hi)]


def family_of(seed: int, split_start: int, split_size: int, family_size: int, family_fraction: float) -> list[int]:
    """Family of each identity of a split: the global id of the family's first member, or -1.

    Blocks of ``family_size`` consecutive identities (the last one may be shorter); a block of at
    least two identities is a family with probability ``family_fraction`` (one seeded draw per
    block, so the answer does not depend on other splits).
    """
    out = [-1] * split_size
    if family_size <= 1:
        return out
    for b0 in range(0, split_size, family_size):
        members = range(b0, min(b0 + family_size, split_size))
        if len(members) >= 2 and np.random.default_rng([seed, 3, split_start + b0]).random() < family_fraction:
            for i in members:
                out[i] = split_start + b0
    return out


# ----------------------------------------------------------------------------- identities


def identity_params(seed: int, gid: int, difficulty_range: tuple[float, float] = (0.0, 1.0),
                    family: int = -1, family_share: float = 0.8) -> dict[str, Any]:
    """Geometry, colours and difficulty of global identity ``gid`` (deterministic).

    With ``family >= 0`` every parameter but the difficulty is pulled towards the family's own
    draw: ``family + (1 - family_share) * (own - family)`` (booleans: the family's).
    """
    p = _draw_params(np.random.default_rng([seed, 0, gid]), difficulty_range)
    if family < 0:
        return p
    f = _draw_params(np.random.default_rng([seed, 4, family]), difficulty_range)
    keep = 1.0 - float(family_share)
    for k, v in f.items():
        if k == "difficulty":
            continue
        if isinstance(v, bool):
            p[k] = v
        else:
            p[k] = v + keep * (p[k] - v)
    return p


def _draw_params(r: np.random.Generator, difficulty_range: tuple[float, float]) -> dict[str, Any]:
    lo, hi = difficulty_range
    skin = np.array([0.55, 0.42, 0.33]) + r.uniform(-0.25, 0.35) * np.array([1.0, 0.95, 0.9])
    skin += r.normal(0, 0.04, 3)
    return {
        "difficulty": float(r.uniform(lo, hi)),
        "skin": np.clip(skin, 0.1, 1.0),
        "hair": np.clip(r.uniform(0.0, 0.8) * r.uniform(0.5, 1.0, 3), 0, 1),
        "iris": np.clip(r.uniform(0.05, 0.7, 3), 0, 1),
        "lip": np.clip(np.array([0.6, 0.25, 0.25]) + r.normal(0, 0.08, 3), 0, 1),
        "face_rx": r.uniform(0.27, 0.36),
        "face_ry": r.uniform(0.36, 0.46),
        "hair_top": r.uniform(0.0, 0.12),
        "hair_side": r.uniform(1.0, 1.18),
        "eye_y": r.uniform(-0.12, -0.02),
        "eye_dx": r.uniform(0.10, 0.16),
        "eye_rx": r.uniform(0.045, 0.075),
        "eye_ry": r.uniform(0.022, 0.04),
        "brow_dy": r.uniform(0.045, 0.08),
        "brow_tilt": r.uniform(-0.35, 0.35),
        "brow_th": r.uniform(0.008, 0.02),
        "nose_len": r.uniform(0.08, 0.16),
        "nose_w": r.uniform(0.025, 0.05),
        "mouth_y": r.uniform(0.16, 0.26),
        "mouth_w": r.uniform(0.07, 0.14),
        "mouth_th": r.uniform(0.012, 0.03),
        "mouth_curve": r.uniform(-2.5, 3.5),
        "glasses": bool(r.random() < 0.25),
        "tex_freq": r.uniform(8, 30),
        "tex_angle": r.uniform(0, np.pi),
        "tex_amp": r.uniform(0.0, 0.12),
        "spots": r.uniform(-1, 1, (3, 3)) * np.array([0.3, 0.4, 1.0]),
    }


_JITTER_KEYS = ("eye_y", "eye_dx", "eye_ry", "brow_dy", "brow_tilt", "mouth_y", "mouth_w",
                "mouth_curve", "nose_len", "face_rx", "face_ry")


def _soft(inside: np.ndarray, scale_px: float) -> np.ndarray:
    """Antialiased mask from a signed 'distance' (>0 inside) in normalised units."""
    return np.clip(inside * np.float32(scale_px) + np.float32(0.5), 0.0, 1.0)


def _f32(c: Any) -> np.ndarray:
    return np.asarray(c, dtype=np.float32)


def render_face(p: dict[str, Any], rng: np.random.Generator, size: int = 112) -> np.ndarray:
    """Renders one perturbed image of identity ``p``.

    Args:
        p: ``identity_params`` output.
        rng: Per-image generator.
        size: Output side ``S``.

    Returns:
        ``[S, S, 3] uint8`` RGB image.
    """
    d = p["difficulty"]
    spread = 0.25 + 1.1 * d  # how far this identity's images wander
    q = dict(p)
    for k in _JITTER_KEYS:
        q[k] = p[k] * (1.0 + rng.normal(0, 0.05 * spread))
    q["mouth_curve"] = p["mouth_curve"] + rng.normal(0, 0.8 * spread)

    # Pose: inverse-map the output grid into face coordinates (centre 0, unit = S),
    # so the warp costs nothing extra and adds no resampling blur.
    ang = np.deg2rad(rng.normal(0, 4 + 10 * d))
    scale = 1.0 + rng.normal(0, 0.03 + 0.06 * d)
    yaw = 1.0 - abs(rng.normal(0, 0.04 + 0.12 * d))
    tx, ty = rng.normal(0, 0.015 + 0.035 * d, 2)
    g = ((np.arange(size, dtype=np.float32) + 0.5) / size - 0.5).astype(np.float32)
    X, Y = np.meshgrid(g, g)
    c, s = np.float32(np.cos(ang)), np.float32(np.sin(ang))
    Xs, Ys = X - np.float32(tx), Y - np.float32(ty)
    x = (c * Xs + s * Ys) / np.float32(scale * yaw)
    y = (-s * Xs + c * Ys) / np.float32(scale)
    px = float(size * scale)

    def window(cx: float, cy: float, radius: float) -> tuple[slice, slice]:
        # Output-pixel box that contains a face-space disc (forward pose map).
        fx, fy = cx * scale * yaw, cy * scale
        ox = (c * fx - s * fy + tx + 0.5) * size
        oy = (s * fx + c * fy + ty + 0.5) * size
        r = radius * scale * size + 2
        return (slice(max(int(oy - r), 0), max(min(int(oy + r) + 1, size), 0)),
                slice(max(int(ox - r), 0), max(min(int(ox + r) + 1, size), 0)))

    def ell(cx: float, cy: float, rx: float, ry: float, rot: float = 0.0,
            win: tuple[slice, slice] | None = None) -> tuple[tuple[slice, slice], np.ndarray]:
        win = win or window(cx, cy, max(rx, ry))
        u, v = x[win] - np.float32(cx), y[win] - np.float32(cy)
        if rot:
            cr, sr = np.float32(np.cos(rot)), np.float32(np.sin(rot))
            u, v = cr * u + sr * v, -sr * u + cr * v
        r = np.sqrt((u * np.float32(1 / rx)) ** 2 + (v * np.float32(1 / ry)) ** 2)
        return win, _soft((1.0 - r) * np.float32(min(rx, ry)), px)

    img = np.empty((size, size, 3), dtype=np.float32)
    # Background and lighting are per image, not per identity: no shortcut cue.
    bg = _f32(rng.uniform(0.1, 0.9, 3))
    img[:] = bg * (0.85 + 0.3 * (Y[..., None] + 0.5))

    def paint(wm: tuple[tuple[slice, slice], np.ndarray], color: Any, alpha: float = 1.0) -> None:
        win, m = wm
        sub = img[win]
        sub += (m * np.float32(alpha))[..., None] * (_f32(color) - sub)

    frx, fry = q["face_rx"], q["face_ry"]
    paint(ell(0, -0.02 - p["hair_top"] * 0.5, frx * p["hair_side"], fry + p["hair_top"] * 0.6), p["hair"])
    # Skin with identity texture: oriented stripes + a few blotches.
    fwin, fmask = ell(0, 0.02, frx, fry)
    fx_, fy_ = x[fwin], y[fwin]
    ca, sa = np.cos(p["tex_angle"]), np.sin(p["tex_angle"])
    tex = np.float32(p["tex_amp"]) * np.sin(np.float32(p["tex_freq"] * 2 * np.pi) * (ca * fx_ + sa * fy_))
    inv = np.float32(-0.5 / (0.08 * frx) ** 2)
    for sx, sy, amp in p["spots"]:
        tex += np.float32(0.12 * amp) * np.exp(((fx_ - sx * frx) ** 2 + (fy_ - sy * fry) ** 2) * inv)
    skin = _f32(p["skin"]) * (1.0 + tex[..., None])
    sub = img[fwin]
    sub += fmask[..., None] * (skin - sub)
    # Hair fringe over the forehead.
    fw, fm = ell(0, -fry * 0.95 - p["hair_top"] * 0.3, frx * 0.95, 0.06 + p["hair_top"] * 0.6)
    paint((fw, fm * (y[fw] < -fry * 0.55)), p["hair"])

    ey, edx, erx, ery = q["eye_y"], q["eye_dx"], p["eye_rx"], q["eye_ry"]
    for side in (-1.0, 1.0):
        cx = side * edx
        paint(ell(cx, ey, erx, ery), (0.95, 0.95, 0.92))
        look = rng.normal(0, 0.008 + 0.01 * d)
        paint(ell(cx + look, ey, ery * 0.95, ery * 0.95), p["iris"])
        paint(ell(cx + look, ey, ery * 0.4, ery * 0.4), (0.05, 0.05, 0.05))
        paint(ell(cx, ey - q["brow_dy"], erx * 1.2, p["brow_th"], side * q["brow_tilt"]), p["hair"] * 0.8)
        if p["glasses"]:
            w, outer = ell(cx, ey, erx * 1.6, ery * 2.6)
            _, inner = ell(cx, ey, erx * 1.6 - 0.012, ery * 2.6 - 0.012, win=w)
            paint((w, np.clip(outer - inner, 0, 1)), (0.1, 0.1, 0.1))
    # Nose: a shaded ridge ending in a darker tip.
    nl, nw = q["nose_len"], p["nose_w"]
    paint(ell(0, ey + 0.03 + nl * 0.5, nw * 0.45, nl * 0.5), p["skin"] * 0.75, 0.5)
    paint(ell(0, ey + 0.03 + nl, nw, nw * 0.55), p["skin"] * 0.6, 0.7)
    # Mouth: a curved band v = -curve * u^2.
    my, mw, mth = q["mouth_y"], q["mouth_w"], p["mouth_th"]
    mwin = window(0, my, mw + 0.05)
    u, v = x[mwin], y[mwin] - np.float32(my)
    band = np.float32(mth) - np.abs(v + np.float32(q["mouth_curve"]) * u * u)
    paint((mwin, _soft(np.minimum(band, np.float32(mw) - np.abs(u)), px)), p["lip"])

    # Illumination: gain, directional light, colour cast.
    gain = 1.0 + rng.normal(0, 0.06 + 0.2 * d)
    la = rng.uniform(0, 2 * np.pi)
    k = (0.1 + 0.4 * d) * rng.random() * 2
    light = np.float32(gain) * (1.0 + np.float32(k * np.cos(la)) * X + np.float32(k * np.sin(la)) * Y)
    cast = _f32(1.0 + rng.normal(0, 0.02 + 0.06 * d, 3))
    img *= light[..., None]
    img *= cast
    # Occlusion patch (hand, scarf, sticker...).
    if rng.random() < 0.15 + 0.5 * d:
        h, w_ = (rng.uniform(0.15, 0.25 + 0.25 * d, 2) * size).astype(int)
        y0, x0 = rng.integers(0, size - h), rng.integers(0, size - w_)
        img[y0 : y0 + h, x0 : x0 + w_] = _f32(rng.uniform(0, 1, 3))
    # Blur: k passes of the [1, 2, 1] / 4 kernel approximate a Gaussian of variance k / 2.
    sigma = rng.uniform(0, 0.4 + 1.4 * d)
    for _ in range(int(round(2 * sigma * sigma))):
        _blur121(img)
    img += _noise_tile(size, rng) * np.float32(0.01 + 0.04 * d)
    np.clip(img, 0, 1, out=img)
    return (img * 255 + 0.5).astype(np.uint8)


def _blur121(img: np.ndarray) -> None:
    """One in-place separable [1, 2, 1] / 4 pass (edges replicated)."""
    for axis in (0, 1):
        a = np.moveaxis(img, axis, 0)
        prev = np.concatenate([a[:1], a[:-1]])
        nxt = np.concatenate([a[1:], a[-1:]])
        a *= np.float32(0.5)
        a += (prev + nxt) * np.float32(0.25)


_NOISE: dict[int, np.ndarray] = {}


def _noise_tile(size: int, rng: np.random.Generator) -> np.ndarray:
    """A random window of a fixed noise bank: sensor noise without per-image RNG cost."""
    bank = _NOISE.get(size)
    if bank is None:
        bank = np.random.default_rng(12345).standard_normal((4, size + 32, size + 32, 3), dtype=np.float32)
        _NOISE[size] = bank
    t, oy, ox = rng.integers(4), rng.integers(32), rng.integers(32)
    return bank[t, oy : oy + size, ox : ox + size]


def encode_jpeg(img: np.ndarray, quality: int = 90) -> bytes:
    """``[H, W, 3] uint8`` -> JPEG bytes."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


Job = tuple  # (seed, gid, n, size, quality, drange[, family, family_share, first_image])


def render_identity(args: Job) -> list[bytes]:
    """Renders ``n`` JPEGs of global identity ``gid``.

    ``args`` is ``(seed, gid, n, size, quality, drange)``, optionally followed by
    ``(family, family_share, first_image)``: image numbers run from ``first_image`` (probe
    images continue after the training ones).
    """
    seed, gid, n, size, quality, drange = args[:6]
    family, share, k0 = args[6:9] if len(args) > 6 else (-1, 0.8, 0)
    p = identity_params(seed, gid, drange, family, share)
    return [encode_jpeg(render_face(p, np.random.default_rng([seed, 1, gid, k]), size), quality)
            for k in range(k0, k0 + n)]


# ----------------------------------------------------------------------------- driver


def _render_all(jobs: list[Job], workers: int,
                progress: bool, desc: str) -> Iterator[list[bytes]]:
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(j[2] for j in jobs), desc=desc, unit="img")
    try:
        if workers <= 1:
            results: Iterator[list[bytes]] = map(render_identity, jobs)
            for r in results:
                if bar is not None:
                    bar.update(len(r))
                yield r
        else:
            with mp.get_context("fork").Pool(workers) as pool:
                for r in pool.imap(render_identity, jobs, chunksize=2):
                    if bar is not None:
                        bar.update(len(r))
                    yield r
    finally:
        if bar is not None:
            bar.close()


def _jobs(cfg: SynthConfig, gids: list[int], sizes: list[int], families: list[int],
          first: list[int] | None = None) -> list[Job]:
    base = [(cfg.seed, g, n, cfg.image_size, cfg.jpeg_quality, cfg.difficulty_range) for g, n in zip(gids, sizes)]
    if not cfg.study_options:
        return base  # the exact jobs of earlier versions
    first = first or [0] * len(gids)
    return [j + (f, cfg.family_share, k0) for j, f, k0 in zip(base, families, first)]


def _write_rec(path: Path, jobs: list[Job], workers: int, progress: bool, desc: str) -> int:
    with InsightFaceWriter(path) as w:
        for label, jpegs in enumerate(_render_all(jobs, workers, progress, desc)):
            for j in jpegs:
                w.add(label, j)
        return w.num_images


def generate_synthetic_dataset(out_dir: str | os.PathLike[str], config: SynthConfig | None = None, *,
                               workers: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Writes the synthetic dataset (see module doc) and returns a summary.

    Args:
        out_dir: Output directory (created).
        config: Sizes and seed (default ``SynthConfig()``: 500 x 40 training images).
        workers: Rendering processes (default: CPU count).
        progress: Show tqdm progress bars.

    Returns:
        Summary dict: paths, counts, seconds.
    """
    cfg = config or SynthConfig()
    if cfg.ver_identities < 2 or cfg.ver_images_per_identity < 2:
        raise ValueError("verification needs >= 2 identities with >= 2 images each")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
    t0 = time.perf_counter()
    n_tr, n_ver, n_cl = cfg.train_identities, cfg.ver_identities, cfg.cluster_identities
    train_ids = list(range(n_tr))
    ver_ids = list(range(n_tr, n_tr + n_ver))
    cl_ids = list(range(n_tr + n_ver, n_tr + n_ver + n_cl))
    # The difficulty (nuisance level) is drawn before any family blending, so it is the same
    # with or without families.
    diff = lambda gids: [identity_params(cfg.seed, g, cfg.difficulty_range)["difficulty"] for g in gids]  # noqa: E731
    fam = {name: family_of(cfg.seed, ids[0] if ids else 0, len(ids), cfg.family_size, cfg.family_fraction)
           for name, ids in (("train", train_ids), ("verification", ver_ids), ("clustering", cl_ids))}
    sizes = cfg.class_sizes()

    n_train = _write_rec(out / "train.rec", _jobs(cfg, train_ids, sizes, fam["train"]), workers, progress, "train")

    # Verification pairs: identities disjoint from training.
    jobs = _jobs(cfg, ver_ids, [cfg.ver_images_per_identity] * n_ver, fam["verification"])
    ver_imgs = list(_render_all(jobs, workers, progress, "verification"))
    r = np.random.default_rng([cfg.seed, 2])
    k = cfg.ver_images_per_identity
    images: list[bytes] = []
    issame: list[bool] = []
    pairs: list[list[int]] = []
    for i in range(cfg.ver_pairs):
        same = i % 2 == 0
        a = int(r.integers(n_ver))
        if same:
            b = a
            ia, ib = r.choice(k, 2, replace=False)
        else:
            b = int((a + r.integers(1, n_ver)) % n_ver)
            ia, ib = r.integers(k, size=2)
        images += [ver_imgs[a][int(ia)], ver_imgs[b][int(ib)]]
        issame.append(same)
        pairs.append([ver_ids[a], ver_ids[b]])
    write_verification_bin(out / "verification.bin", images, issame)

    n_cluster = 0
    if n_cl:
        n_cluster = _write_rec(out / "cluster.rec", _jobs(cfg, cl_ids, [cfg.cluster_images_per_identity] * n_cl,
                                                          fam["clustering"]), workers, progress, "cluster")
        np.save(out / "cluster_labels.npy",
                np.repeat(np.arange(n_cl, dtype=np.int64), cfg.cluster_images_per_identity))

    n_probe = 0
    if cfg.probe_images_per_identity:
        k = cfg.probe_images_per_identity
        n_probe = _write_rec(out / "probe.rec", _jobs(cfg, train_ids, [k] * n_tr, fam["train"], sizes),
                             workers, progress, "probe")
        np.save(out / "probe_labels.npy", np.repeat(np.arange(n_tr, dtype=np.int64), k))

    ver_diff = dict(zip(ver_ids, diff(ver_ids)))
    meta = {
        "seed": cfg.seed,
        "config": cfg.record(),
        "difficulty_model": "per-image perturbation magnitude scales with difficulty in [0, 1]",
        "train": {"identities": train_ids, "difficulty": diff(train_ids)},
        "verification": {
            "identities": ver_ids, "difficulty": [ver_diff[g] for g in ver_ids],
            "pairs": pairs, "pair_difficulty": [max(ver_diff[a], ver_diff[b]) for a, b in pairs],
        },
        "clustering": {"identities": cl_ids, "difficulty": diff(cl_ids)},
    }
    if cfg.study_options:
        meta["family_model"] = (f"blocks of {cfg.family_size} identities, a family with probability "
                                f"{cfg.family_fraction}; members share {cfg.family_share} of their parameters")
        meta["size_model"] = (f"{cfg.size_distribution}: " + (f"p(n) ~ n^-{cfg.size_exponent} on "
                              f"[{cfg.images_min}, {cfg.images_max}]" if cfg.size_distribution == "powerlaw"
                              else f"{cfg.images_per_identity} each"))
        meta["train"].update(family=fam["train"], images=sizes)
        meta["verification"]["family"] = fam["verification"]
        meta["clustering"]["family"] = fam["clustering"]
        if n_probe:
            meta["probe"] = {"identities": train_ids, "images_per_identity": cfg.probe_images_per_identity}
    (out / "identities.json").write_text(json.dumps(meta, indent=1))
    rows = ["split,gid,label,family,images,difficulty"]
    for split, ids, n_img in (("train", train_ids, sizes), ("verification", ver_ids, [cfg.ver_images_per_identity] * n_ver),
                              ("clustering", cl_ids, [cfg.cluster_images_per_identity] * n_cl)):
        for label, (g, f, n_i, d) in enumerate(zip(ids, fam[split], n_img, diff(ids))):
            rows.append(f"{split},{g},{label},{f},{n_i},{d:.6f}")
    (out / "identities.csv").write_text("\n".join(rows) + "\n")
    summary = {
        "out_dir": str(out), "train_identities": n_tr, "train_images": n_train,
        "verification_pairs": cfg.ver_pairs, "cluster_identities": n_cl, "cluster_images": n_cluster,
        "probe_images": n_probe, "seconds": round(time.perf_counter() - t0, 2),
    }
    return summary

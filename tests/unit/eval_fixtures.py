"""Evaluation fixtures in the released formats, generated here (never downloaded).

Loose crops are made the way a detector's output relates to an aligned face: an aligned synthetic
face (``dali_pipelines.synth_faces.render_face``, whose landmarks are by construction the ArcFace
template) is warped into a larger canvas by a known similarity transform, and the template points
are moved with it. Aligning the loose crop with the moved points must give the face back.
"""

from __future__ import annotations

import math

import numpy as np

from dali_pipelines.align import ARCFACE_TEMPLATE_112


def similarity(scale: float, angle_deg: float, tx: float, ty: float) -> np.ndarray:
    """``[2, 3]`` matrix of ``x -> scale * R(angle) x + t``."""
    a = math.radians(angle_deg)
    c, s = math.cos(a), math.sin(a)
    return np.array([[scale * c, -scale * s, tx], [scale * s, scale * c, ty]])


def aligned_face(gid: int, k: int = 0, seed: int = 0, smooth: float = 1.5) -> np.ndarray:
    """A 112x112 RGB synthetic face of identity ``gid`` (image ``k``), Gaussian-smoothed by
    ``smooth`` pixels: the renderer adds per-pixel sensor noise, which no resampling preserves,
    while real aligned crops are band-limited by the lens and the detector's upsampling."""
    from skimage.filters import gaussian

    from dali_pipelines.synth_faces import identity_params, render_face

    face = render_face(identity_params(seed, gid), np.random.default_rng([seed, 7, gid, k]), 112)
    if smooth > 0:
        face = gaussian(face.astype(np.float64), sigma=smooth, channel_axis=-1, preserve_range=True)
        face = np.clip(np.rint(face), 0, 255).astype(np.uint8)
    return face


def placed(scale: float, angle_deg: float, margin: tuple[int, int] = (20, 30)) -> tuple[np.ndarray, tuple[int, int]]:
    """A similarity (scale, rotation) with the translation that puts the whole transformed
    112x112 square inside a canvas with ``margin = (left/right, top/bottom)`` pixels around it;
    returns ``(matrix, canvas (H, W))``."""
    m = similarity(scale, angle_deg, 0.0, 0.0)
    corners = np.array([[-0.5, -0.5], [111.5, -0.5], [-0.5, 111.5], [111.5, 111.5]]) @ m[:, :2].T
    lo, hi = corners.min(0), corners.max(0)
    m[:, 2] = np.array(margin, dtype=float) - lo
    w, h = np.ceil(hi - lo + 2 * np.array(margin)).astype(int)
    return m, (int(h), int(w))


def loose_crop(face: np.ndarray, matrix: np.ndarray, canvas: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Warps an aligned face into a ``canvas = (H, W)`` image by ``matrix`` (aligned -> loose
    coordinates) and returns ``(image [H, W, 3] uint8, landmarks [5, 2])``.

    The warp is scikit-image's (an independent library from the OpenCV warp under test), with a
    grey background so the face edge is visible.
    """
    from skimage.transform import AffineTransform, warp

    m3 = np.vstack([matrix, [0, 0, 1]])
    inv = AffineTransform(matrix=np.linalg.inv(m3))  # output (loose) -> input (aligned) coordinates
    out = warp(face.astype(np.float64), inv, output_shape=canvas, order=1, mode="constant", cval=90.0,
               preserve_range=True)
    lm = ARCFACE_TEMPLATE_112 @ matrix[:, :2].T + matrix[:, 2]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8), lm


def write_jpeg(path, img: np.ndarray, quality: int = 92) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, format="JPEG", quality=quality)


def make_ijb_release(root, target: str = "IJBC", identities: int = 5, templates_per_identity: int = 3,
                     seed: int = 0, max_impostors: int | None = None):
    """An insightface-layout IJB release under ``root``: ``loose_crop/*.jpg`` (loose crops of
    aligned synthetic faces, each warped by its own random similarity, landmarks moved with it),
    ``meta/<t>_name_5pts_score.txt`` (landmarks and a detector score), ``meta/<t>_face_tid_mid.txt``
    (several media per template, some with several frames) and ``meta/<t>_template_pair_label.txt``
    (every genuine pair and the impostor pairs, shuffled).

    Returns a dict with the truth: ``names``, ``landmarks [N, 5, 2]``, ``scores [N]``, ``tid [N]``,
    ``mid [N]``, ``pairs [P, 3]``.
    """
    from pathlib import Path

    root = Path(root)
    t = target.lower()
    rng = np.random.default_rng(seed)
    names, lms, scores, tids, mids, owner = [], [], [], [], [], {}
    tid, mid = 100, 5000
    for ident in range(identities):
        for _ in range(templates_per_identity):
            tid += 1
            owner[tid] = ident
            for _m in range(int(rng.integers(1, 4))):
                mid += 1
                for _f in range(int(rng.integers(1, 3))):
                    k = len(names)
                    face = aligned_face(ident + 10 * seed, k)
                    m, canvas = placed(rng.uniform(0.9, 1.8), rng.uniform(-30, 30),
                                       (int(rng.integers(5, 40)), int(rng.integers(5, 40))))
                    img, lm = loose_crop(face, m, canvas)
                    name = f"{k + 1}.jpg"
                    write_jpeg(root / "loose_crop" / name, img)
                    names.append(name)
                    lms.append(lm)
                    scores.append(float(rng.uniform(0.3, 1.0)))
                    tids.append(tid)
                    mids.append(mid)
    meta = root / "meta"
    meta.mkdir(parents=True, exist_ok=True)
    with open(meta / f"{t}_name_5pts_score.txt", "w") as f:
        for n, lm, s in zip(names, lms, scores):
            f.write(n + " " + " ".join(f"{v:.3f}" for v in lm.ravel()) + f" {s:.6f}\n")
    with open(meta / f"{t}_face_tid_mid.txt", "w") as f:
        for n, a, b in zip(names, tids, mids):
            f.write(f"{n} {a} {b}\n")
    ids = sorted(owner)
    pairs = [(a, b, int(owner[a] == owner[b])) for i, a in enumerate(ids) for b in ids[i + 1:]]
    if max_impostors is not None:
        gen = [p for p in pairs if p[2]]
        imp = [p for p in pairs if not p[2]]
        pairs = gen + [imp[i] for i in rng.permutation(len(imp))[:max_impostors]]
    pairs = [pairs[i] for i in rng.permutation(len(pairs))]
    with open(meta / f"{t}_template_pair_label.txt", "w") as f:
        f.writelines(f"{a} {b} {y}\n" for a, b, y in pairs)
    return {"names": names, "landmarks": np.asarray(lms, np.float64).round(3),
            "scores": np.asarray(scores).round(6), "tid": np.asarray(tids), "mid": np.asarray(mids),
            "pairs": np.asarray(pairs, np.int64)}


def make_ijbb_clustering(root, subtasks=((3, "clustering_3"), (5, "clustering_5")), faces_per_subject=4, seed=0):
    """IJB-B clustering protocol files as released: ``images/img/<k>.jpg`` loose crops, one CSV per
    subtask (nested subject sets) with the face box, and a landmark file keyed by TEMPLATE_ID.

    Returns ``(images_dir, [csv paths], landmarks_path)``."""
    from pathlib import Path

    root = Path(root)
    rng = np.random.default_rng(seed)
    most = max(n for n, _ in subtasks)
    rows, lm_lines = [], []
    tid = 1000
    for subj in range(most):
        for j in range(faces_per_subject):
            tid += 1
            face = aligned_face(20 + subj, j, seed)
            m, canvas = placed(rng.uniform(1.0, 1.6), rng.uniform(-20, 20), (int(rng.integers(10, 40)), 25))
            img, lm = loose_crop(face, m, canvas)
            fn = f"img/{tid}.jpg"
            write_jpeg(root / "images" / fn, img)
            corners = np.array([[0, 0], [112, 0], [0, 112], [112, 112]], float) @ m[:, :2].T + m[:, 2]
            x0, y0 = corners.min(0)
            x1, y1 = corners.max(0)
            rows.append((tid, 500 + subj, fn, x0, y0, x1 - x0, y1 - y0))
            lm_lines.append(f"{tid} " + " ".join(f"{v:.3f}" for v in lm.ravel()))
    paths = []
    proto = root / "protocol"
    proto.mkdir(parents=True, exist_ok=True)
    for n, name in subtasks:
        p = proto / f"{name}.csv"
        with open(p, "w") as f:
            f.write("TEMPLATE_ID,SUBJECT_ID,FILENAME,FACE_X,FACE_Y,FACE_WIDTH,FACE_HEIGHT,SIGHTING_ID\n")
            for r in rows:
                if r[1] - 500 < n:
                    f.write(f"{r[0]},{r[1]},{r[2]},{r[3]:.1f},{r[4]:.1f},{r[5]:.1f},{r[6]:.1f},7\n")
        paths.append(p)
    lm_path = root / "landmarks.txt"
    lm_path.write_text("\n".join(lm_lines) + "\n")
    return root / "images", paths, lm_path

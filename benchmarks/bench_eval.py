"""Cost of the public benchmarks in `pfc eval` on this machine (figures go to docs/evaluation.md).

Three measurements, each in a fresh process so that its peak resident memory (``ru_maxrss``) is
its own:

- ``ijb``: IJB-C-style 1:1 on ``--images`` generated loose crops (synthetic faces warped by
  random similarities, JPEG, 5 landmarks, detector scores; ~20 images per template as in IJB-C)
  with a randomly initialised ``--backbone``: seconds per 10k images for decode + align (worker
  processes) + embed with flip, template aggregation; then pair scoring and both TAR@FAR rules at
  IJB-C size (``--templates`` x ``--pairs`` with synthetic template features).
- ``cluster``: the IJB-B clustering algorithms on ``--faces`` synthetic features of
  ``--subjects`` identities (68k / 1,845: the largest subtask): seconds and peak memory each.
- ``megaface``: challenge 1 streaming with ``--probes`` probes against ``--distractors``
  synthetic distractor features generated block by block: seconds and peak memory.

Examples::

    python benchmarks/bench_eval.py ijb --images 2000 --backbone mobilefacenet
    python benchmarks/bench_eval.py cluster --faces 68000 --subjects 1845
    python benchmarks/bench_eval.py megaface --probes 3530 --distractors 1000000
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _child(q, fn, args) -> None:
    try:
        q.put(fn(*args))
    except BaseException as e:  # the parent must not wait forever
        q.put({"error": repr(e)})
        raise


def _in_child(fn, *args) -> dict:
    """Runs ``fn(*args)`` in a fresh spawned (non-daemonic: it may start decoders) process."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_child, args=(q, fn, args))
    proc.start()
    out = q.get()
    proc.join()
    return out


def _blobs(n: int, k: int, d: int, seed: int = 0, spread: float = 0.8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    centers = rng.standard_normal((k, d)).astype(np.float32)
    x = centers[labels] + spread * rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, labels


# ----------------------------------------------------------------------------------- ijb
def _make_release(root: Path, n: int, per_template: int, seed: int = 0) -> None:
    import cv2
    from PIL import Image

    from dali_pipelines.align import ARCFACE_TEMPLATE_112
    from dali_pipelines.synth_faces import identity_params, render_face

    rng = np.random.default_rng(seed)
    (root / "loose_crop").mkdir(parents=True)
    (root / "meta").mkdir()
    lm_lines, tm_lines = [], []
    for i in range(n):
        tid = i // per_template
        face = render_face(identity_params(seed, tid // 2), rng, 112)  # two templates per subject
        s, a = rng.uniform(1.0, 1.8), np.deg2rad(rng.uniform(-30, 30))
        m = np.array([[s * np.cos(a), -s * np.sin(a), 0.0], [s * np.sin(a), s * np.cos(a), 0.0]])
        corners = np.array([[0, 0], [112, 0], [0, 112], [112, 112]], float) @ m[:, :2].T
        m[:, 2] = 30 - corners.min(0)
        w, h = (corners.max(0) - corners.min(0) + 60).astype(int)
        img = cv2.warpAffine(face, m, (int(w), int(h)), flags=cv2.INTER_LINEAR, borderValue=(90, 90, 90))
        Image.fromarray(img).save(root / "loose_crop" / f"{i + 1}.jpg", quality=92)
        lm = ARCFACE_TEMPLATE_112 @ m[:, :2].T + m[:, 2]
        lm_lines.append(f"{i + 1}.jpg " + " ".join(f"{v:.2f}" for v in lm.ravel()) + f" {rng.uniform(0.5, 1):.4f}")
        tm_lines.append(f"{i + 1}.jpg {tid} {i // 3}")
    (root / "meta" / "ijbc_name_5pts_score.txt").write_text("\n".join(lm_lines) + "\n")
    (root / "meta" / "ijbc_face_tid_mid.txt").write_text("\n".join(tm_lines) + "\n")
    t = (n + per_template - 1) // per_template
    pairs = [f"{a} {b} {int(a // 2 == b // 2)}" for a in range(t) for b in range(a + 1, t)]
    (root / "meta" / "ijbc_template_pair_label.txt").write_text("\n".join(pairs) + "\n")


def _ijb_images(root: str, backbone: str, workers: int, batch: int) -> dict:
    import torch

    from partial_fc.backbones import build_backbone
    from train.evaluate.embedders import _torch_embedder
    from train.evaluate.ijb import evaluate_ijb

    from train.evaluate.faces import FaceSpec, iter_face_batches
    from train.evaluate.ijb import read_ijb_meta

    meta = read_ijb_meta(root, "IJBC")
    specs = [FaceSpec(n, landmarks=lm) for n, lm in zip(meta.names, meta.landmarks)]
    t0 = time.perf_counter()
    for _ in iter_face_batches(Path(root) / "loose_crop", specs, batch_size=batch, workers=workers):
        pass
    decode_s = time.perf_counter() - t0
    torch.manual_seed(0)
    emb = _torch_embedder(build_backbone(backbone, num_features=512), torch.device("cpu"), kind="bench",
                          source="random", backbone=backbone, embedding_size=512)
    t0 = time.perf_counter()
    r = evaluate_ijb(emb, root, "IJBC", workers=workers, batch_size=batch, progress=False)
    secs = time.perf_counter() - t0
    return {"backbone": backbone, "workers": workers, "images": r.num_images, "templates": r.num_templates,
            "decode_align_seconds": decode_s, "decode_align_img_per_s": r.num_images / decode_s, "seconds": secs,
            "seconds_per_10k_images": secs / r.num_images * 10_000, "peak_mib": _peak_mib(),
            "torch_threads": torch.get_num_threads()}


def _ijb_pairs(templates: int, pairs: int, dim: int) -> dict:
    from train.evaluate.ijb import score_template_pairs, tar_at_far_nearest
    from train.evaluate.verification import FAR_GRID, tar_at_far

    rng = np.random.default_rng(0)
    feats, subj = _blobs(templates, templates // 6, dim, spread=1.2)
    ids = np.arange(templates, dtype=np.int64)
    t1 = rng.integers(0, templates, pairs)
    t2 = rng.integers(0, templates, pairs)
    t0 = time.perf_counter()
    s = score_template_pairs(ids, feats.astype(np.float64), t1, t2)
    t_score = time.perf_counter() - t0
    same = subj[t1] == subj[t2]
    t0 = time.perf_counter()
    tar_at_far_nearest(s, same, FAR_GRID)
    tar_at_far(s, same, FAR_GRID)
    t_tar = time.perf_counter() - t0
    return {"templates": templates, "pairs": pairs, "score_seconds": t_score, "tar_seconds": t_tar,
            "peak_mib": _peak_mib()}


# ------------------------------------------------------------------------------- cluster
def _cluster(faces: int, subjects: int, dim: int, algo: str, n_init: int, max_iter: int) -> dict:
    from train.evaluate.ijbb_clustering import SubtaskConfig, cluster_subtask

    x, y = _blobs(faces, subjects, dim)
    base = _peak_mib()
    t0 = time.perf_counter()
    (r,) = cluster_subtask(x, y, SubtaskConfig(algorithms=(algo,), kmeans_n_init=n_init, kmeans_max_iter=max_iter))
    return {"algorithm": algo, "faces": faces, "subjects": subjects, "seconds": time.perf_counter() - t0,
            "peak_mib": _peak_mib(), "peak_mib_before_clustering": base, "bcubed_f": r.scores.bcubed_f,
            "params": {k: v for k, v in r.params.items()}}


# ------------------------------------------------------------------------------ megaface
def _megaface(probes: int, identities: int, distractors: int, dim: int, block: int) -> dict:
    from train.evaluate.megaface import MegaFaceStream

    p, labels = _blobs(probes, identities, dim, seed=1, spread=0.9)
    s = MegaFaceStream(p, labels, distractors, (1e-6,))
    rng = np.random.default_rng(2)
    base = _peak_mib()
    t0 = time.perf_counter()
    for i in range(0, distractors, block):
        d = rng.standard_normal((min(block, distractors - i), dim), dtype=np.float32)
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        s.update(d)
    r = s.result()
    return {"probes": probes, "distractors": distractors, "seconds": time.perf_counter() - t0,
            "peak_mib": _peak_mib(), "peak_mib_before_stream": base, "rank1": r.rank1,
            "tar_at_1e-6": r.tar_at_far[1e-6], "tail_kept": int(s.tail.numel())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    a = sub.add_parser("ijb")
    a.add_argument("--images", type=int, default=2000)
    a.add_argument("--per-template", type=int, default=20)
    a.add_argument("--backbone", default="mobilefacenet")
    a.add_argument("--workers", type=int, default=2)
    a.add_argument("--batch-size", type=int, default=128)
    a.add_argument("--templates", type=int, default=23_124)
    a.add_argument("--pairs", type=int, default=15_658_489)
    a.add_argument("--dim", type=int, default=512)
    c = sub.add_parser("cluster")
    c.add_argument("--faces", type=int, default=68_195)
    c.add_argument("--subjects", type=int, default=1845)
    c.add_argument("--dim", type=int, default=512)
    c.add_argument("--algorithms", default="kmeans,dbscan,agglomerative")
    c.add_argument("--kmeans-n-init", type=int, default=1)
    c.add_argument("--kmeans-max-iter", type=int, default=30)
    m = sub.add_parser("megaface")
    m.add_argument("--probes", type=int, default=3530)
    m.add_argument("--identities", type=int, default=80)
    m.add_argument("--distractors", type=int, default=1_000_000)
    m.add_argument("--dim", type=int, default=512)
    m.add_argument("--block", type=int, default=8192)
    args = p.parse_args(argv)
    out = []
    if args.what == "ijb":
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            _make_release(Path(d), args.images, args.per_template)
            print(f"fixture: {args.images} loose crops in {time.perf_counter() - t0:.1f} s", flush=True)
            out.append(_in_child(_ijb_images, d, args.backbone, args.workers, args.batch_size))
            print(json.dumps(out[-1]), flush=True)
        out.append(_in_child(_ijb_pairs, args.templates, args.pairs, args.dim))
    elif args.what == "cluster":
        for algo in args.algorithms.split(","):
            out.append(_in_child(_cluster, args.faces, args.subjects, args.dim, algo, args.kmeans_n_init,
                                 args.kmeans_max_iter))
            print(json.dumps(out[-1]), flush=True)
    else:
        out.append(_in_child(_megaface, args.probes, args.identities, args.distractors, args.dim, args.block))
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``pfc eval``: verification, template verification, clustering and feature-distribution report.

Examples::

    pfc eval --checkpoint runs/cpu_demo --synthetic data/synth --out runs/cpu_demo/eval
    pfc eval --onnx model.onnx --bin lfw.bin cfp_fp.bin --out eval/       # flip fusion is the default
    pfc eval --weights backbone.pt --ijb IJBC/ --ijb-target IJBC --save-scores --out eval/
    pfc eval --weights backbone.pt --megaface megaface_testpack/ --megaface-distractors 1000000 --out eval/
    pfc eval --weights export/backbone.pt --templates ijbc_templates.txt \\
        --template-pairs ijbc_pairs.txt --template-images ijbc_crops/ --media-pooling --out eval/

Writes ``report.md``, ``metrics.json`` and PNG figures into ``--out`` (see
:mod:`train.evaluate.report` and docs/evaluation.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

__all__ = ["main"]

log = logging.getLogger("train.evaluate")


class _InputError(ValueError):
    """A command-line input that is missing or unusable (exit status 2)."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pfc eval",
        description="Evaluate a face-embedding model: pair-set verification (10-fold accuracy, TAR@FAR, ROC; "
                    "the five .bin sets), IJB-B/C 1:1 on the insightface release, IJB-B clustering on the official "
                    "subtasks, MegaFace challenge 1, IJB-style 1:1 on your own template lists, clustering (K-means, DBSCAN, agglomerative; NMI, "
                    "pairwise and BCubed F), similarity histograms and, from a checkpoint, the distribution of "
                    "concentration phi and margins. Writes report.md, metrics.json and PNGs to --out.")
    src = p.add_argument_group("model (exactly one)")
    ex = src.add_mutually_exclusive_group(required=True)
    ex.add_argument("--checkpoint", help="a run directory, its checkpoints/ root, or a step_* directory")
    ex.add_argument("--weights", help="a `pfc export` backbone.pt (state dict + metadata)")
    ex.add_argument("--onnx", help="an ONNX backbone (run by onnxruntime on the CPU)")
    src.add_argument("--config", default=None,
                     help="the run's config.toml for the head statistics (default: found above the checkpoint)")
    data = p.add_argument_group("data (at least one)")
    data.add_argument("--bin", nargs="+", default=[], metavar="FILE|DIR",
                      help="LFW-layout .bin pair sets, or a folder: every *.bin in it, reported in the usual "
                           "order (LFW, CFP-FP, AgeDB-30, CALFW, CPLFW, then the others by name)")
    data.add_argument("--templates", help="template list: lines 'TEMPLATE IMAGE LABEL [MEDIA]'")
    data.add_argument("--template-pairs", help="template pairs: lines 'TEMPLATE1 TEMPLATE2 LABEL(0/1)'")
    data.add_argument("--template-images",
                      help="where IMAGE points: a .rec (IMAGE = 0-based image position) or a directory (relative paths)")
    data.add_argument("--media-pooling", action="store_true",
                      help="average each medium's images before averaging a template's media")
    data.add_argument("--ijb", metavar="ROOT",
                      help="IJB-B/C 1:1 verification on the insightface release layout: ROOT holds loose_crop/ and "
                           "meta/<t>_{name_5pts_score,face_tid_mid,template_pair_label}.txt")
    data.add_argument("--ijb-target", choices=("IJBB", "IJBC"), type=str.upper, help="which IJB set ROOT is")
    data.add_argument("--ijbb-clustering", nargs="+", default=[], metavar="CSV|DIR",
                      help="IJB-B clustering subtask CSVs as released (TEMPLATE_ID, SUBJECT_ID, FILENAME, FACE_X, "
                           "FACE_Y, FACE_WIDTH, FACE_HEIGHT), or their folder (then the --ijbb-largest largest)")
    data.add_argument("--ijbb-images", metavar="DIR", help="the IJB-B folder FILENAME is relative to")
    data.add_argument("--ijbb-landmarks", metavar="FILE",
                      help="optional 5-point landmarks 'TEMPLATE_ID x1 y1 ... x5 y5' to align instead of box crops")
    data.add_argument("--megaface", metavar="ROOT",
                      help="MegaFace challenge 1 on the aligned test pack: ROOT holds facescrub_lst, megaface_lst, "
                           "facescrub_images/, megaface_images/ and optionally the *_noises.txt lists")
    data.add_argument("--clustering-rec", help="a labelled .rec whose images are clustered")
    data.add_argument("--synthetic", metavar="DIR",
                      help="a `pfc synth` dataset: uses its verification.bin, cluster.rec (clustering) and a template "
                           "protocol generated from cluster.rec, and reports results by identity difficulty")
    opt = p.add_argument_group("options")
    opt.add_argument("--out", required=True, help="output directory for report.md, metrics.json and PNGs")
    opt.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True,
                     help="flip-test fusion: embed image + mirror, sum, normalise (default: on, as in training-time "
                          "evaluation and the published tables; --no-flip turns it off)")
    ijb = p.add_argument_group("IJB-B/C 1:1 (--ijb); the defaults are the published recipe, N1 D1 F1")
    ijb.add_argument("--ijb-align", action=argparse.BooleanOptionalAction, default=True,
                     help="align each loose crop from its 5 landmarks (off: the images are aligned crops already)")
    ijb.add_argument("--ijb-raw-norm", action=argparse.BooleanOptionalAction, default=True,
                     help="keep each image feature's norm (N1); --no-ijb-raw-norm normalises each image (N0)")
    ijb.add_argument("--ijb-detector-score", action=argparse.BooleanOptionalAction, default=True,
                     help="weight each image feature by its detector score (D1); off: D0")
    ijb.add_argument("--ijb-media-pooling", action=argparse.BooleanOptionalAction, default=True,
                     help="average each medium's images, then sum the media (off: sum the images)")
    ijb.add_argument("--save-scores", action="store_true",
                     help="write ijb_<target>_scores.npy (one float64 per pair, pair-file order) into --out")
    opt.add_argument("--workers", type=int, default=2, help="image decoding processes (IJB, clustering, MegaFace)")
    opt.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                     help="progress bars on stderr for the long protocols")
    opt.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (torch models; ONNX runs on CPU)")
    opt.add_argument("--batch-size", type=int, default=128)
    opt.add_argument("--image-size", type=int, default=None,
                     help="input side of torch models (default 112; ONNX: from the file, this when it is not fixed)")
    opt.add_argument("--input-mean", type=float, default=None,
                     help="ONNX files without our metadata only: the model's input is (x - MEAN) / STD on RGB pixels")
    opt.add_argument("--input-std", type=float, default=None, help="see --input-mean")
    opt.add_argument("--folds", type=int, default=10, help="folds of the accuracy protocol")
    opt.add_argument("--cluster-sizes", default=None,
                     help="comma-separated identity counts of the clustering subsets (default: 1/4, 1/2, all)")
    opt.add_argument("--algorithms", default="kmeans,dbscan,agglomerative", help="clustering algorithms to run")
    opt.add_argument("--kmeans-n-init", type=int, default=10)
    opt.add_argument("--dbscan-eps", type=float, default=None,
                     help="DBSCAN radius as a cosine distance (default: the k-distance rule, see docs/evaluation.md)")
    opt.add_argument("--dbscan-min-samples", type=int, default=3)
    opt.add_argument("--dbscan-quantile", type=float, default=0.7, help="quantile of the k-distance rule")
    opt.add_argument("--linkage", choices=("average", "ward"), default="average",
                     help="agglomerative: average linkage on cosine distance, or ward on normalised features")
    opt.add_argument("--ijbb-largest", type=int, default=3,
                     help="--ijbb-clustering DIR: run its K largest subtasks (3: 512, 1,024, 1,845 subjects, as the paper)")
    opt.add_argument("--cluster-knn", type=int, default=30,
                     help="IJB-B clustering: neighbours per face of the agglomerative k-NN graph")
    opt.add_argument("--kmeans-max-iter", type=int, default=300)
    opt.add_argument("--megaface-distractors", type=int, default=1_000_000,
                     help="distractor count, 10^k (the first N of the list after dropping noise)")
    opt.add_argument("--megaface-distractor-list", default=None, help="use this list instead of ROOT/megaface_lst")
    opt.add_argument("--megaface-noise", action=argparse.BooleanOptionalAction, default=True,
                     help="drop the images of ROOT/facescrub_noises.txt and ROOT/megaface_noises.txt when present")
    opt.add_argument("--megaface-block", type=int, default=8192, help="distractors scored per block")
    opt.add_argument("--templates-per-identity", type=int, default=4,
                     help="--synthetic: templates per clustering identity in the generated protocol")
    opt.add_argument("--seed", type=int, default=0, help="seed of the clustering subsets, K-means and the protocol")
    return p


def _file(path: Optional[str], what: str) -> Optional[Path]:
    if path is None:
        return None
    p = Path(path)
    if not p.exists():
        raise _InputError(f"{what} {p} does not exist")
    return p


#: The order published tables use for the five standard pair sets (file stems as distributed).
BIN_ORDER = ("lfw", "cfp_fp", "agedb_30", "calfw", "cplfw")


def _bin_key(path: Path) -> tuple:
    stem = path.stem.lower()
    return (BIN_ORDER.index(stem), "") if stem in BIN_ORDER else (len(BIN_ORDER), stem)


def _bin_files(items: Sequence[str]) -> list[Path]:
    """``--bin`` arguments as files: a folder stands for its ``*.bin`` files, in the usual order."""
    out: list[Path] = []
    for item in items:
        p = _file(item, "--bin file")
        if p.is_dir():
            found = sorted(p.glob("*.bin"), key=_bin_key)
            if not found:
                raise _InputError(f"--bin folder {p} holds no .bin file")
            out += found
        else:
            out.append(p)
    return out


def _bin_table(evals, flip: bool, folds: int = 10) -> str:
    """One plain-text table of the pair sets' accuracies, in the order evaluated."""
    rows = [f"[pfc eval] pair sets ({folds}-fold accuracy, flip {'on' if flip else 'off'}):",
            f"  {'set':<16} {'pairs':>7} {'accuracy':>9} {'std':>7}"]
    for pe in evals:
        r = pe.result
        rows.append(f"  {r.name:<16} {r.num_pairs:>7} {100 * r.accuracy:>8.2f}% {100 * r.accuracy_std:>6.2f}%")
    return "\n".join(rows)


def _ijbb_csvs(items: Sequence[str], largest: int) -> list[Path]:
    """``--ijbb-clustering`` arguments as CSV files; a folder gives its ``largest`` subtasks by
    subject count (smallest first)."""
    from .ijbb_clustering import read_clustering_csv

    out: list[Path] = []
    for item in items:
        p = _file(item, "--ijbb-clustering")
        if p.is_dir():
            found = sorted(p.glob("*.csv"))
            if not found:
                raise _InputError(f"--ijbb-clustering folder {p} holds no .csv file")
            if largest < 1:
                raise _InputError("--ijbb-largest must be >= 1")
            sized = sorted(((read_clustering_csv(f).num_subjects, f) for f in found), key=lambda x: (x[0], x[1].name))
            out += [f for _, f in sized[-largest:]]
        else:
            out.append(p)
    return out


def _sizes(text: Optional[str]) -> Optional[tuple[int, ...]]:
    if text is None:
        return None
    try:
        sizes = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise _InputError(f"--cluster-sizes must be comma-separated integers, got {text!r}") from None
    if not sizes:
        raise _InputError("--cluster-sizes is empty")
    return sizes


def _synthetic(args) -> tuple[list[Path], Path, dict]:
    d = Path(args.synthetic)
    need = ["identities.json", "verification.bin", "cluster.rec", "cluster.idx"]
    missing = [n for n in need if not (d / n).is_file()]
    if missing:
        raise _InputError(f"--synthetic {d} lacks {missing}; make it with `pfc synth` (a dataset with clustering "
                          "identities, the default)")
    meta = json.loads((d / "identities.json").read_text())
    return [d / "verification.bin"], d / "cluster.rec", meta


def _terciles(difficulty: np.ndarray) -> list[tuple[str, np.ndarray]]:
    edges = np.quantile(difficulty, [0.0, 1 / 3, 2 / 3, 1.0])
    out = []
    for i in range(3):
        lo, hi = edges[i], edges[i + 1]
        mask = (difficulty >= lo) & ((difficulty < hi) if i < 2 else (difficulty <= hi))
        out.append((f"{['easy', 'medium', 'hard'][i]} {lo:.2f}-{hi:.2f}", mask))
    return out


def _verification_by_difficulty(scores, issame, threshold, pair_difficulty) -> list[dict]:
    rows = []
    for label, mask in _terciles(np.asarray(pair_difficulty, dtype=np.float64)):
        s, y = scores[mask], issame[mask]
        rows.append({
            "range": label, "num_pairs": int(mask.sum()),
            "accuracy": float(((s >= threshold) == y).mean()) if mask.any() else None,
            "pos_mean": float(s[y].mean()) if y.any() else None,
            "neg_mean": float(s[~y].mean()) if (~y).any() else None,
            "gap": float(s[y].mean() - s[~y].mean()) if y.any() and (~y).any() else None,
        })
    return rows


def _clustering_by_difficulty(runs, labels, identity_difficulty) -> list[dict]:
    from .clustering import bcubed_per_sample

    largest = max(r.num_identities for r in runs)
    rows = []
    for r in runs:
        if r.num_identities != largest:
            continue
        lab = labels[r.indices]
        prec, rec = bcubed_per_sample(lab, r.predictions)
        ids = np.unique(lab)
        for label, mask in _terciles(np.asarray(identity_difficulty, dtype=np.float64)[ids]):
            sel = np.isin(lab, ids[mask])
            p, q = float(prec[sel].mean()), float(rec[sel].mean())
            rows.append({"algorithm": r.algorithm, "range": label, "num_identities": int(mask.sum()),
                         "num_samples": int(sel.sum()), "bcubed_precision": p, "bcubed_recall": q,
                         "bcubed_f": 0.0 if p + q == 0 else 2 * p * q / (p + q)})
    return rows


def _phi_by_difficulty(report, step_dir: Path, args, meta: dict) -> tuple[Optional[dict], str]:
    """Phi and margins against the synthetic training identities' difficulty, when the checkpoint
    was trained on this dataset's ``train.rec`` (class i = training identity i)."""
    from train.config import ConfigError, load_config

    from .concentration import concentration_by_difficulty
    from .embedders import find_run_config

    cfg_path = Path(args.config) if args.config else find_run_config(step_dir)
    diff = meta.get("train", {}).get("difficulty")
    try:
        train_rec = Path(load_config(cfg_path).data.train_rec) if cfg_path else None
    except ConfigError:
        train_rec = None
    mine = Path(args.synthetic) / "train.rec"
    if (diff is None or train_rec is None or not train_rec.is_file() or not mine.is_file()
            or train_rec.resolve() != mine.resolve() or len(diff) != report.num_classes):
        return None, ("Phi by identity difficulty: skipped, the checkpoint was not trained on "
                      f"{mine} (its data.train_rec is {train_rec}).")
    return concentration_by_difficulty(report, np.asarray(diff)), ""


def run(args) -> dict:
    """Runs the evaluation ``args`` describes and writes the report (see :func:`main`)."""
    from .clustering import ClusteringProtocolConfig, run_clustering_protocol
    from .concentration import class_concentration
    from .embedders import ImageSource, embed_image_tokens, embed_rec, load_embedder
    from .report import EvalResults, PairSetEval, write_report
    from .runner import load_pair_set, pair_scores
    from .templates import evaluate_templates, make_synthetic_template_protocol, read_template_list, read_template_pairs
    from .verification import verify_scores

    if args.batch_size < 1 or args.folds < 2 or (args.image_size is not None and args.image_size < 8):
        raise _InputError("--batch-size must be >= 1, --folds >= 2 and --image-size >= 8")
    bins = _bin_files(args.bin)
    tmpl = [args.templates, args.template_pairs, args.template_images]
    if any(tmpl) and not all(tmpl):
        raise _InputError("template verification needs --templates, --template-pairs and --template-images together")
    tmpl_files = [_file(p, f"--{n}") for p, n in zip(tmpl, ("templates", "template-pairs", "template-images"))]
    cluster_rec = _file(args.clustering_rec, "--clustering-rec")
    meta = None
    if args.synthetic:
        _file(args.synthetic, "--synthetic directory")
        syn_bins, syn_rec, meta = _synthetic(args)
        bins += [b for b in syn_bins if b not in bins]
        cluster_rec = cluster_rec or syn_rec
    ijbb_csvs = _ijbb_csvs(args.ijbb_clustering, args.ijbb_largest)
    if ijbb_csvs and not args.ijbb_images:
        raise _InputError("--ijbb-clustering needs --ijbb-images (the folder its FILENAME column is relative to)")
    if bool(args.ijb) != bool(args.ijb_target):
        raise _InputError("IJB verification needs --ijb ROOT and --ijb-target IJBB|IJBC together")
    ijb_root = _file(args.ijb, "--ijb folder")
    if not bins and not all(tmpl) and cluster_rec is None and not args.synthetic and ijb_root is None \
            and not ijbb_csvs \
            and not args.megaface:
        raise _InputError("nothing to evaluate: give --bin, --ijb, --templates/--template-pairs/--template-images, "
                          "--clustering-rec or --synthetic")
    cl_cfg = ClusteringProtocolConfig(
        sizes=_sizes(args.cluster_sizes), algorithms=tuple(a.strip() for a in args.algorithms.split(",") if a.strip()),
        seed=args.seed, kmeans_n_init=args.kmeans_n_init, dbscan_eps=args.dbscan_eps,
        dbscan_min_samples=args.dbscan_min_samples, dbscan_quantile=args.dbscan_quantile, linkage=args.linkage)
    out = Path(args.out)

    t0 = time.perf_counter()
    emb = load_embedder(checkpoint=args.checkpoint, weights=args.weights, onnx=args.onnx, device=args.device,
                        input_mean=args.input_mean, input_std=args.input_std,
                        image_size=args.image_size if args.onnx else None)
    if emb.kind != "onnx":
        emb.image_size = args.image_size or 112
    res = EvalResults(model=emb.describe(), flip=args.flip)
    res.seconds["load_model"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    seen: dict[str, int] = {}
    for path in bins:
        pairs = load_pair_set(path, emb.image_size)
        name = pairs.name if pairs.name not in seen else f"{pairs.name}_{seen[pairs.name] + 1}"
        seen[pairs.name] = seen.get(pairs.name, 0) + 1
        scores = pair_scores(emb.embed(pairs.images, args.batch_size, args.flip))
        result = verify_scores(scores, pairs.issame, name=name, folds=args.folds)
        pe = PairSetEval(result, scores, pairs.issame)
        if meta is not None and path == Path(args.synthetic) / "verification.bin":
            pdiff = meta.get("verification", {}).get("pair_difficulty")
            if pdiff is not None and len(pdiff) == len(scores):
                pe.by_difficulty = _verification_by_difficulty(scores, pairs.issame, result.threshold, pdiff)
        res.verification.append(pe)
        print(f"[pfc eval] {result.summary()}", flush=True)
    if bins:
        res.seconds["verification"] = time.perf_counter() - t0
        print(_bin_table(res.verification, args.flip, args.folds), flush=True)

    if args.synthetic and not all(tmpl):
        labels = ImageSource(cluster_rec).labels
        proto = out / "protocol"
        t_path, p_path = make_synthetic_template_protocol(labels, proto, seed=args.seed,
                                                          templates_per_identity=args.templates_per_identity)
        tmpl_files = [t_path, p_path, cluster_rec]
    if tmpl_files[0] is not None:
        t0 = time.perf_counter()
        tl = read_template_list(tmpl_files[0])
        tp = read_template_pairs(tmpl_files[1], tl)
        src = ImageSource(tmpl_files[2], emb.image_size)
        feats = embed_image_tokens(emb, src, tl.images, args.batch_size, args.flip).numpy()
        res.templates = evaluate_templates(feats, tl, tp, media_pooling=args.media_pooling)
        res.template_source = {"templates": str(tmpl_files[0]), "pairs": str(tmpl_files[1]),
                               "images": str(tmpl_files[2])}
        tars = "  ".join(f"TAR@FAR={f:g}: {v:.4f}" for f, v in res.templates.tar.items())
        print(f"[pfc eval] templates: {tl.num_templates} templates, {res.templates.num_pairs} pairs  {tars}", flush=True)
        res.seconds["templates"] = time.perf_counter() - t0

    if ijb_root is not None:
        from .ijb import evaluate_ijb

        t0 = time.perf_counter()
        r = evaluate_ijb(emb, ijb_root, args.ijb_target, align=args.ijb_align, flip=args.flip,
                         raw_norm=args.ijb_raw_norm, detector_score=args.ijb_detector_score,
                         media_pooling=args.ijb_media_pooling, batch_size=args.batch_size, workers=args.workers,
                         device=str(emb.device), progress=args.progress,
                         save_scores=out if args.save_scores else None)
        res.ijb[r.target] = r
        for rule, tars in (("nearest FAR", r.tar_nearest), ("FAR <= target", r.tar_at_most)):
            cells = "  ".join(f"{f:.0e}: {'n/a' if v != v else f'{100 * v:.2f}'}" for f, v in sorted(tars.items()))
            print(f"[pfc eval] {r.target} ({r.settings['mode']}) TAR% by {rule}: {cells}", flush=True)
        res.seconds[f"ijb_{r.target}"] = time.perf_counter() - t0

    if ijbb_csvs:
        from .ijbb_clustering import SubtaskConfig, evaluate_ijbb_clustering

        t0 = time.perf_counter()
        algos = tuple(a.strip() for a in args.algorithms.split(",") if a.strip())
        sc = SubtaskConfig(algorithms=algos, seed=args.seed, kmeans_n_init=args.kmeans_n_init,
                           kmeans_max_iter=args.kmeans_max_iter, dbscan_eps=args.dbscan_eps,
                           dbscan_min_samples=args.dbscan_min_samples, dbscan_quantile=args.dbscan_quantile,
                           knn=args.cluster_knn)
        info, runs = evaluate_ijbb_clustering(emb, ijbb_csvs, _file(args.ijbb_images, "--ijbb-images"),
                                              landmarks=_file(args.ijbb_landmarks, "--ijbb-landmarks"),
                                              flip=args.flip, batch_size=args.batch_size, workers=args.workers,
                                              progress=args.progress, config=sc)
        res.ijbb_clustering = {"subtasks": info, "runs": runs, "config": dict(vars(sc)),
                               "alignment": "landmarks" if args.ijbb_landmarks else "box crop"}
        for r in runs:
            sc_ = r.scores
            print(f"[pfc eval] IJB-B clustering {r.params['subtask']} ({r.num_identities} subjects, {r.num_samples} "
                  f"faces) {r.algorithm:<13} NMI {sc_.nmi:.4f}  pairwise F {sc_.pairwise_f:.4f}  "
                  f"BCubed F {sc_.bcubed_f:.4f}", flush=True)
        res.seconds["ijbb_clustering"] = time.perf_counter() - t0

    if args.megaface:
        from .megaface import evaluate_megaface

        t0 = time.perf_counter()
        mf = evaluate_megaface(emb, _file(args.megaface, "--megaface folder"), num_distractors=args.megaface_distractors,
                               distractor_list=args.megaface_distractor_list, noise=args.megaface_noise,
                               flip=args.flip, batch_size=args.batch_size, block=args.megaface_block,
                               workers=args.workers, device=str(emb.device), progress=args.progress)
        res.megaface = mf
        tars = "  ".join(f"TAR@FAR={f:.0e}: {'n/a' if v != v else f'{100 * v:.2f}%'}" for f, v in mf.tar_at_far.items())
        print(f"[pfc eval] MegaFace: {mf.num_probes} probes of {mf.num_identities} identities vs {mf.num_distractors} "
              f"distractors  rank-1 {100 * mf.rank1:.2f}%  {tars}", flush=True)
        res.seconds["megaface"] = time.perf_counter() - t0

    if cluster_rec is not None:
        t0 = time.perf_counter()
        feats, labels = embed_rec(emb, cluster_rec, args.batch_size, args.flip)
        res.clustering = run_clustering_protocol(feats.numpy(), labels, cl_cfg)
        res.clustering_info = {"source": str(cluster_rec), "num_images": int(len(labels)),
                               "num_identities": int(len(np.unique(labels))),
                               "config": {k: v for k, v in vars(cl_cfg).items()}}
        if meta is not None and cluster_rec == Path(args.synthetic) / "cluster.rec":
            diff = meta.get("clustering", {}).get("difficulty")
            if diff is not None and len(diff) > int(labels.max()):
                res.clustering_by_difficulty = _clustering_by_difficulty(res.clustering, labels, diff)
        for r in res.clustering:
            s = r.scores
            print(f"[pfc eval] clustering {r.num_identities} ids / {r.num_samples} images  {r.algorithm:<13} "
                  f"NMI {s.nmi:.4f}  pairwise F {s.pairwise_f:.4f}  BCubed F {s.bcubed_f:.4f}", flush=True)
        res.seconds["clustering"] = time.perf_counter() - t0

    if emb.checkpoint_dir is not None:
        try:
            res.concentration = class_concentration(emb.checkpoint_dir, args.config)
        except ValueError as e:
            res.concentration_note = f"Head statistics unavailable: {e}"
            print(f"[pfc eval] {res.concentration_note}", file=sys.stderr, flush=True)
        if res.concentration is not None and meta is not None:
            res.concentration_by_difficulty, note = _phi_by_difficulty(res.concentration, emb.checkpoint_dir,
                                                                       args, meta)
            if note:
                res.concentration_note = note
    else:
        res.concentration_note = (f"The model was given as {emb.kind} (backbone only); phi and margins live in a "
                                  "training checkpoint's head: pass --checkpoint to see them.")
    res.model = emb.describe()  # the embedding size as the model's outputs showed it
    metrics = write_report(out, res)
    print(f"[pfc eval] report: {out / 'report.md'}  metrics: {out / 'metrics.json'}  "
          f"figures: {', '.join(metrics['figures'].values()) or 'none'}", flush=True)
    return metrics


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``pfc eval``.

    Args:
        argv: Arguments after ``eval`` (``sys.argv[2:]`` style).

    Returns:
        0 on success, 2 for missing or unusable inputs (the message says which).
    """
    from dali_pipelines import RecordIOError, UnsafePickleError

    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        run(args)
    except (ValueError, FileNotFoundError, UnsafePickleError, RecordIOError) as e:
        print(f"pfc eval: {e}", file=sys.stderr)
        return 2
    return 0

"""DBSCAN's k-distance rule: clustering quality against the quantile (and min_samples).

Embeds a labelled ``.rec`` once with any model ``pfc eval`` accepts, then runs the clustering
protocol's DBSCAN for each (min_samples, quantile) and prints one JSON line per run. The result
that chose the default quantile is in docs/evaluation.md.

Example:
    python benchmarks/eval_dbscan_sweep.py --onnx runs/cpu_demo/export/model.onnx \\
        --rec data/synth/cluster.rec --quantiles 0.5 0.7 0.9 --min-samples 3
"""

from __future__ import annotations

import argparse
import json
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    from train.evaluate.clustering import ClusteringProtocolConfig, run_clustering_protocol
    from train.evaluate.embedders import embed_rec, load_embedder

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint")
    src.add_argument("--weights")
    src.add_argument("--onnx")
    p.add_argument("--rec", required=True, help="a labelled .rec (e.g. the synthetic cluster.rec)")
    p.add_argument("--quantiles", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    p.add_argument("--min-samples", type=int, nargs="+", default=[3])
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="identity counts (default: all)")
    args = p.parse_args(argv)
    emb = load_embedder(checkpoint=args.checkpoint, weights=args.weights, onnx=args.onnx)
    feats, labels = embed_rec(emb, args.rec)
    sizes = tuple(args.sizes) if args.sizes else (len(set(labels.tolist())),)
    for ms in args.min_samples:
        for q in args.quantiles:
            cfg = ClusteringProtocolConfig(sizes=sizes, algorithms=("dbscan",), dbscan_quantile=q,
                                           dbscan_min_samples=ms)
            for r in run_clustering_protocol(feats.numpy(), labels, cfg):
                s = r.scores
                print(json.dumps({"min_samples": ms, "quantile": q, "identities": r.num_identities,
                                  "eps": round(r.params["eps"], 4), "clusters": s.num_clusters,
                                  "noise": round(r.noise_fraction, 3), "nmi": round(s.nmi, 4),
                                  "pairwise_f": round(s.pairwise_f, 4), "bcubed_p": round(s.bcubed_precision, 4),
                                  "bcubed_r": round(s.bcubed_recall, 4), "bcubed_f": round(s.bcubed_f, 4)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``pfc eval``: verification, template verification, clustering and feature-distribution report
(options and run in train/evaluate/cli.py)."""

from __future__ import annotations

import argparse

from .verb import Verb


def add_arguments(p: argparse.ArgumentParser) -> None:
    # TEMPORARY adapter: train/evaluate/cli.py still builds its own parser.
    p.add_argument_group("options (see train/evaluate/cli.py)").add_argument("eval_argv", nargs=argparse.REMAINDER)


def run(args: argparse.Namespace) -> int:
    from ..evaluate.cli import main

    return main(args.eval_argv)


VERBS = (Verb(
    "eval", help="evaluate a model: pair/template verification, clustering, similarity and phi report",
    description="Evaluate a face-embedding model (a checkpoint, a `pfc export` backbone.pt or ONNX): pair-set "
                "verification (10-fold accuracy, TAR@FAR, ROC), IJB-style 1:1 template verification, clustering "
                "(K-means, DBSCAN, agglomerative; NMI, pairwise and BCubed F), similarity histograms and, from a "
                "checkpoint, the distribution of concentration phi and margins. Writes report.md, metrics.json "
                "and PNGs to --out. Exit code 2 for missing or unusable inputs.",
    examples=("pfc eval --checkpoint runs/cpu_demo --synthetic data/synth --out runs/cpu_demo/eval",
              "pfc eval --onnx model.onnx --bin lfw.bin cfp_fp.bin --flip --out eval/",
              "pfc eval --weights export/backbone.pt --templates ijbc_templates.txt --template-pairs ijbc_pairs.txt "
              "--template-images ijbc_crops/ --media-pooling --out eval/"),
    add_arguments=add_arguments, run=run),)

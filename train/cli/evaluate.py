"""``pfc eval``: verification, template verification, clustering and feature-distribution report
(the options and the run are in train/evaluate/cli.py)."""

from __future__ import annotations

import argparse
import sys

from .verb import Verb


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..evaluate.cli import add_arguments as add

    add(p)


def run(args: argparse.Namespace) -> int:
    """Evaluates and writes the report; 0, or 2 for missing or unusable inputs (the message says which)."""
    from dali_pipelines import RecordIOError, UnsafePickleError

    from ..evaluate.cli import run as evaluate

    try:
        evaluate(args)
    except (ValueError, FileNotFoundError, UnsafePickleError, RecordIOError) as e:
        print(f"pfc eval: {e}", file=sys.stderr)
        return 2
    return 0


VERBS = (Verb(
    "eval", help="evaluate a model: .bin pair sets, IJB-B/C, IJB-B clustering, MegaFace, templates, clustering",
    description="Evaluate a face-embedding model (a checkpoint, a `pfc export` backbone.pt or ONNX): pair-set "
                "verification (10-fold accuracy, TAR@FAR, ROC; the five .bin sets), IJB-B/C 1:1 on the "
                "insightface release, IJB-B clustering on the official subtasks, MegaFace challenge 1, IJB-style "
                "1:1 on your own template lists, clustering (K-means, DBSCAN, agglomerative; NMI, pairwise and "
                "BCubed F), similarity histograms and, from a checkpoint, the distribution of concentration phi "
                "and margins. Writes report.md, metrics.json and PNGs to --out. Exit code 2 for missing or "
                "unusable inputs.",
    examples=("pfc eval --checkpoint runs/cpu_demo --synthetic data/synth --out runs/cpu_demo/eval",
              "pfc eval --onnx model.onnx --bin lfw.bin cfp_fp.bin --out eval/       # flip fusion is the default",
              "pfc eval --weights backbone.pt --ijb IJBC/ --ijb-target IJBC --save-scores --out eval/",
              "pfc eval --weights backbone.pt --megaface megaface_testpack/ --megaface-distractors 1000000 --out eval/",
              "pfc eval --weights export/backbone.pt --templates ijbc_templates.txt --template-pairs ijbc_pairs.txt "
              "--template-images ijbc_crops/ --media-pooling --out eval/"),
    add_arguments=add_arguments, run=run),)

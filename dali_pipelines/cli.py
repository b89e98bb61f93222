"""Command line of the data layer: ``pack`` and ``synth`` (``python -m dali_pipelines``).

Each command is three importable, side-effect-free pieces, the convention of the project's
``pfc`` tree (train/cli/): ``add_<cmd>_arguments(parser)`` adds its options to any parser or
argument group, ``run_<cmd>(args) -> int`` runs a parsed namespace, and :func:`main` parses
``python -m dali_pipelines <cmd> ...``. ``pfc pack`` and ``pfc synth --out`` reuse the first two
(this package never imports ``train``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["PACK_HELP", "PACK_DESCRIPTION", "SYNTH_HELP", "SYNTH_DESCRIPTION", "add_pack_arguments",
           "run_pack", "add_synth_arguments", "run_synth", "build_parser", "main"]

PACK_HELP = "image folder tree (one sub-folder per identity) -> .rec/.idx (or shards)"
PACK_DESCRIPTION = ("Packs ROOT/<identity>/<images> into RecordIO. Re-running the same command resumes an "
                    "interrupted pack (finished shards are verified and kept). `pack --verify DATASET` checks "
                    "a packed .rec or shard manifest.")
SYNTH_HELP = "deterministic synthetic identity dataset"
SYNTH_DESCRIPTION = ("Generates a deterministic synthetic identity dataset (training, verification, clustering) "
                     "in --out.")


def _group(parser, title: str):
    """An argument group titled ``title`` of ``parser`` (a group given as ``parser`` is used as is)."""
    return parser.add_argument_group(title) if isinstance(parser, argparse.ArgumentParser) else parser


def add_pack_arguments(parser) -> None:
    """Adds the positionals and options of ``pack`` to ``parser`` (a parser or an argument group)."""
    io = _group(parser, "input and output")
    io.add_argument("root", type=Path, nargs="?", help="folder with one sub-folder of images per identity")
    io.add_argument("out", type=Path, nargs="?",
                    help="output .rec path (the .idx is written next to it); with --shards the output "
                         "stem: OUT-00000-of-0000N.rec/.idx and the manifest OUT.json")
    io.add_argument("--verify", type=Path, default=None, metavar="DATASET",
                    help="re-read every record header of DATASET (.rec or shard .json) and report; "
                         "nothing is decoded or written (takes no ROOT/OUT)")
    p = _group(parser, "pack options")
    p.add_argument("--size", type=int, default=112, help="output side in pixels (default 112)")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded images")
    p.add_argument("--workers", type=int, default=None, help="processes (default: CPU count)")
    p.add_argument("--shards", type=int, default=None,
                   help="write N shards in plain layout, one writer process per shard, plus OUT.json")
    p.add_argument("--layout", choices=("auto", "insightface", "plain"), default="auto",
                   help="auto (default): insightface for one file below 2^24 records, else plain")
    p.add_argument("--landmarks", type=Path, default=None, metavar="FILE",
                   help="align every image from 5 landmarks before storing it; one line per image: "
                        "NAME x1 y1 ... x5 y5 [score], NAME relative to ROOT (needs the eval extra: OpenCV)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_pack(args: argparse.Namespace) -> int:
    """Runs ``pack`` (or ``pack --verify``). Returns 0 ok, 1 nothing packed or a problem found,
    2 bad input, 130 interrupted."""
    from .pack import pack_folder, verify_dataset

    try:
        if args.verify is not None:
            if args.root is not None:
                raise ValueError("pack --verify DATASET takes no ROOT/OUT")
            if not args.verify.is_file():
                raise ValueError(f"pack --verify: {args.verify} does not exist (a .rec or a shard .json)")
            report = verify_dataset(args.verify)
            print(report.format())
            return 0 if report.ok else 1
        if args.root is None or args.out is None:
            raise ValueError("pack needs ROOT and OUT (or --verify DATASET)")
        try:
            summary = pack_folder(args.root, args.out, size=args.size, quality=args.quality,
                                  workers=args.workers, progress=not args.no_progress,
                                  layout=args.layout, shards=args.shards, landmarks=args.landmarks)
        except KeyboardInterrupt:
            print("pack interrupted: finished shards are kept, nothing partial looks complete; "
                  "run the same command again to resume", file=sys.stderr)
            return 130
    except (ValueError, OSError) as e:  # bad input, PackError, RecordIOError, unreadable paths
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary.format())
    return 0 if summary.images else 1


def add_synth_arguments(parser, *, out_required: bool = True, shared: bool = True) -> None:
    """Adds the options of ``synth`` to ``parser`` (a parser or an argument group).

    Args:
        out_required: Whether ``--out`` is required (``pfc synth`` also has a recipe form).
        shared: Whether to add ``--workers`` and ``--no-progress`` too (``pfc synth`` adds them
            to a group of options both of its forms take).
    """
    s = _group(parser, "dataset")
    s.add_argument("--out", type=Path, required=out_required, help="output directory")
    s.add_argument("--identities", type=int, default=500, help="training identities")
    s.add_argument("--images", type=int, default=40, help="images per training identity")
    s.add_argument("--ver-identities", type=int, default=100, help="verification identities")
    s.add_argument("--ver-images", type=int, default=10, help="images per verification identity")
    s.add_argument("--ver-pairs", type=int, default=1000, help="verification pairs (half positive)")
    s.add_argument("--cluster-identities", type=int, default=50, help="clustering identities")
    s.add_argument("--cluster-images", type=int, default=20, help="images per clustering identity")
    s.add_argument("--size", type=int, default=112, help="image side in pixels")
    s.add_argument("--seed", type=int, default=0, help="master seed")
    s.add_argument("--quality", type=int, default=90, help="JPEG quality")
    s.add_argument("--difficulty", type=float, nargs=2, default=(0.0, 1.0), metavar=("LO", "HI"),
                   help="identity difficulty range (default 0 1)")
    s.add_argument("--family-size", type=int, default=1, help="identities per look-alike family block (1 = none)")
    s.add_argument("--family-fraction", type=float, default=0.5, help="probability that a block is a family")
    s.add_argument("--family-share", type=float, default=0.8, help="fraction of parameters family members share")
    s.add_argument("--sizes", choices=("fixed", "powerlaw"), default="fixed",
                   help="training images per identity: fixed (--images) or a power law on [--images-min, --images-max]")
    s.add_argument("--images-min", type=int, default=2, help="smallest power-law class size")
    s.add_argument("--images-max", type=int, default=200, help="largest power-law class size")
    s.add_argument("--size-exponent", type=float, default=1.0, help="a of p(n) ~ n^-a (1 = log-uniform)")
    s.add_argument("--probe-images", type=int, default=0, help="extra images per training identity (probe.rec)")
    if shared:
        add_synth_shared_arguments(_group(parser, "run options"))


def add_synth_shared_arguments(parser) -> None:
    """``--workers`` and ``--no-progress`` of ``synth``."""
    parser.add_argument("--workers", type=int, default=None, help="processes (default: CPU count)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_synth(args: argparse.Namespace) -> int:
    """Runs ``synth --out DIR ...``; prints the summary as one JSON line. Returns 0, or 2 for bad input."""
    from .synth_faces import SynthConfig, generate_synthetic_dataset

    try:
        cfg = SynthConfig(
            train_identities=args.identities, images_per_identity=args.images,
            ver_identities=args.ver_identities, ver_images_per_identity=args.ver_images,
            ver_pairs=args.ver_pairs, cluster_identities=args.cluster_identities,
            cluster_images_per_identity=args.cluster_images, image_size=args.size,
            seed=args.seed, jpeg_quality=args.quality, difficulty_range=tuple(args.difficulty),
            family_size=args.family_size, family_fraction=args.family_fraction,
            family_share=args.family_share, size_distribution=args.sizes, images_min=args.images_min,
            images_max=args.images_max, size_exponent=args.size_exponent,
            probe_images_per_identity=args.probe_images,
        )
        summary = generate_synthetic_dataset(args.out, cfg, workers=args.workers, progress=not args.no_progress)
    except (ValueError, OSError) as e:  # a bad size or range, an unwritable directory
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


def build_parser(prog: str = "python -m dali_pipelines") -> argparse.ArgumentParser:
    """The argparse parser with the ``pack`` and ``synth`` subcommands."""
    parser = argparse.ArgumentParser(prog=prog, description="partial-fc data tools")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{pack,synth}")
    add_pack_arguments(sub.add_parser("pack", help=PACK_HELP, description=PACK_DESCRIPTION))
    add_synth_arguments(sub.add_parser("synth", help=SYNTH_HELP, description=SYNTH_DESCRIPTION))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``python -m dali_pipelines <command> ...``; returns the process exit code."""
    args = build_parser().parse_args(argv)
    return {"pack": run_pack, "synth": run_synth}[args.command](args)

"""Command line of the data layer: ``pack`` and ``synth``.

``main(argv)`` is importable without side effects; the project CLI ``pfc``
delegates ``pfc pack`` / ``pfc synth`` to it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path


def build_parser(prog: str = "python -m dali_pipelines") -> argparse.ArgumentParser:
    """The argparse parser with the ``pack`` and ``synth`` subcommands."""
    parser = argparse.ArgumentParser(prog=prog, description="partial-fc data tools")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pack", help="image folder tree (one sub-folder per identity) -> .rec/.idx (or shards)",
                       description="Packs ROOT/<identity>/<images> into RecordIO. Re-running the same "
                                   "command resumes an interrupted pack (finished shards are verified and "
                                   "kept). `pack --verify DATASET` checks a packed .rec or shard manifest.")
    p.add_argument("root", type=Path, nargs="?", help="folder with one sub-folder of images per identity")
    p.add_argument("out", type=Path, nargs="?",
                   help="output .rec path (the .idx is written next to it); with --shards the output "
                        "stem: OUT-00000-of-0000N.rec/.idx and the manifest OUT.json")
    p.add_argument("--size", type=int, default=112, help="output side in pixels (default 112)")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded images")
    p.add_argument("--workers", type=int, default=None, help="processes (default: CPU count)")
    p.add_argument("--shards", type=int, default=None,
                   help="write N shards in plain layout, one writer process per shard, plus OUT.json")
    p.add_argument("--layout", choices=("auto", "insightface", "plain"), default="auto",
                   help="auto (default): insightface for one file below 2^24 records, else plain")
    p.add_argument("--verify", type=Path, default=None, metavar="DATASET",
                   help="re-read every record header of DATASET (.rec or shard .json) and report; "
                        "nothing is decoded or written")
    p.add_argument("--landmarks", type=Path, default=None, metavar="FILE",
                   help="align every image from 5 landmarks before storing it; one line per image: "
                        "NAME x1 y1 ... x5 y5 [score], NAME relative to ROOT (needs the eval extra: OpenCV)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    s = sub.add_parser("synth", help="deterministic synthetic identity dataset")
    s.add_argument("--out", type=Path, required=True, help="output directory")
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
    s.add_argument("--workers", type=int, default=None, help="processes (default: CPU count)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs a data command; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "pack":
            from .pack import pack_folder, verify_dataset

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
            print(summary.format())
            return 0 if summary.images else 1
        if args.command == "synth":
            from .synth_faces import SynthConfig, generate_synthetic_dataset

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
            print(json.dumps(generate_synthetic_dataset(args.out, cfg, workers=args.workers,
                                                        progress=not args.no_progress)))
            return 0
    except (ValueError, OSError) as e:  # bad input, PackError, RecordIOError, unreadable paths
        print(f"error: {e}", file=sys.stderr)
        return 2
    raise AssertionError(args.command)  # argparse restricts the choices

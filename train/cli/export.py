"""``pfc export``: a checkpoint's backbone as a state dict and (optionally) ONNX."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from .verb import Verb


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("input")
    src.add_argument("--checkpoint", required=True,
                     help="a checkpoint directory (step_*), a checkpoint root, or a run directory")
    src.add_argument("--config", default=None,
                     help="the run's config.toml (default: found in the run directory above the checkpoint)")
    out = p.add_argument_group("output")
    out.add_argument("--out", default=None, help="output directory (default: <run dir>/export)")
    out.add_argument("--onnx", action="store_true", help="also export ONNX and check it with onnxruntime")
    out.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")


def _find_upwards(start: Path, name: str, levels: int = 3) -> Optional[Path]:
    d = start
    for _ in range(levels + 1):
        if (d / name).is_file():
            return d / name
        d = d.parent
    return None


def _locate(checkpoint: str, config: Optional[str]) -> tuple[Path, Path]:
    """(the step directory, the run's config.toml) of ``--checkpoint``/``--config``.

    Raises:
        ValueError: No complete checkpoint, or no config.toml found.
    """
    from ..checkpoint import find_latest

    ck = Path(checkpoint)
    if (ck / "checkpoints").is_dir():  # a run directory
        ck = ck / "checkpoints"
    step_dir = ck if (ck / "manifest.json").is_file() else find_latest(ck)
    if step_dir is None:
        raise ValueError(f"no complete checkpoint under {ck}")
    cfg_path = Path(config) if config else _find_upwards(step_dir, "config.toml")
    if cfg_path is None:
        raise ValueError(f"no config.toml above {step_dir}; pass --config")
    return step_dir, cfg_path


def _load_backbone(step_dir: Path, cfg_path: Path, cfg):
    """The backbone ``cfg`` describes, with the checkpoint's weights, in eval mode.

    Raises:
        ValueError: The checkpoint is unreadable or does not fit the backbone.
    """
    from partial_fc.backbones import build_backbone

    from ..checkpoint import CheckpointError, export_backbone_state

    try:
        state = export_backbone_state(step_dir)
    except CheckpointError as e:
        raise ValueError(str(e)) from e
    b = cfg.backbone
    model = build_backbone(b.name, num_features=b.num_features, dropout=b.dropout)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # a config that does not describe this checkpoint
        first = str(e).strip().splitlines()
        raise ValueError(f"{step_dir} does not fit backbone {b.name!r} with num_features={b.num_features} "
                         f"from {cfg_path} ({first[-1].strip() if first else e}); pass the run's --config") from e
    return model.eval()


def run(args: argparse.Namespace) -> int:
    """Exports; prints the written paths as JSON. 0 done, 2 no checkpoint, no config or a mismatch."""
    from ..config import load_config
    from ..export import check_onnx, export_onnx, export_state_dict

    try:
        step_dir, cfg_path = _locate(args.checkpoint, args.config)
        cfg = load_config(cfg_path)
        model = _load_backbone(step_dir, cfg_path, cfg)
    except ValueError as e:
        print(f"pfc export: {e}", file=sys.stderr)
        return 2
    b = cfg.backbone
    out_dir = Path(args.out) if args.out else cfg_path.parent / "export"
    step = int(step_dir.name.split("_")[-1]) if step_dir.name.startswith("step_") else -1
    meta = {"backbone": b.name, "embedding_size": b.num_features, "step": step, "checkpoint": str(step_dir)}
    result = {"state_dict": str(export_state_dict(model, out_dir / "backbone.pt", meta))}
    if args.onnx:
        path = export_onnx(model, out_dir / cfg.export.output_name, embedding_size=b.num_features,
                           backbone_name=b.name, opset=args.opset)
        result["onnx"] = str(path)
        result["onnx_max_abs_diff"] = check_onnx(model, path, batch=5)
    print(json.dumps(result, indent=2))
    return 0


VERBS = (Verb(
    "export", help="export a checkpoint's backbone (no head) as a state dict and, with --onnx, ONNX",
    description="Export a checkpoint's backbone (no head) as backbone.pt (state dict + metadata) and, with "
                "--onnx, as ONNX checked against torch with onnxruntime. Prints the written paths as JSON.",
    examples=("pfc export --checkpoint runs/cpu_demo --onnx",
              "pfc export --checkpoint runs/cpu_demo/checkpoints/step_000300 --out export/"),
    add_arguments=add_arguments, run=run),)

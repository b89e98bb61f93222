"""The `pfc` command: one entry point with subcommands (also `python -m train`).

Every subcommand is a ``main(argv) -> int`` function, callable from tests::

    pfc train   [--config RECIPE] [--set section.key=value ...]   train (under torchrun/Slurm or alone)
    pfc synth   [--config RECIPE] [--set ...] | --out DIR ...      make the synthetic identity dataset
    pfc pack    ROOT OUT.rec [--shards N] | --verify DATASET       image folders -> RecordIO (resumable)
    pfc eval    ...                                                verification / clustering / report
    pfc export  --checkpoint DIR [--onnx]                          backbone -> state dict (+ ONNX)
    pfc plan    ...                                                per-rank memory plan
    pfc ablate  --out DIR [--variants ...] [--seeds ...] [--quick]    the ablation study (docs/results.md)
    pfc config  [--config RECIPE] [--set ...] | --list             print the resolved config
    pfc demo                                                       the README's main job
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

log = logging.getLogger("train.cli")


# ---------------------------------------------------------------------------------------- exit codes
#: Exit codes of `pfc train` (docs/launch.md has the table; launch/torchrun.sh and the Slurm
#: scripts pass them on): 0 done, 2 bad input or config, 3 diverged, 75 checkpointed on a signal
#: and resumable (train.trainer.EXIT_PREEMPTED), anything else a crash.
EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3

#: Set by launch/torchrun.sh (and the Slurm scripts): each training process writes its exit code
#: to ``<dir>/round<restart>.rank<rank>`` so the launcher can report the workers' own code
#: (torchrun's agent turns every failure into 1, and a signal to it into its own error).
EXIT_STATUS_DIR_ENV = "PFC_EXIT_STATUS_DIR"


def _input_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input (config, data, checkpoint): a one-line message and exit 2."""
    from dali_pipelines import CorruptImageError, RecordIOError, UnsafePickleError

    from .checkpoint import CheckpointError
    from .config import ConfigError

    return (ConfigError, FileNotFoundError, CheckpointError, CorruptImageError, RecordIOError, UnsafePickleError)


def _clean_error(prog: str, e: BaseException, code: int) -> int:
    """Prints ``prog: message`` (the traceback too with PFC_TRACEBACK=1) and returns ``code``."""
    if os.environ.get("PFC_TRACEBACK", "") not in ("", "0"):
        import traceback

        traceback.print_exception(e, file=sys.stderr)
    print(f"{prog}: {e}", file=sys.stderr, flush=True)
    return code


def _record_exit_status(code: int) -> None:
    """Writes this process's exit code where the launcher looks for it (see EXIT_STATUS_DIR_ENV)."""
    out = os.environ.get(EXIT_STATUS_DIR_ENV)
    if not out:
        return
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    round_ = os.environ.get("TORCHELASTIC_RESTART_COUNT", os.environ.get("SLURM_RESTART_COUNT", "0"))
    try:
        path = Path(out) / f"round{int(round_)}.rank{int(rank)}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{code}\n")
    except (OSError, ValueError) as e:  # the exit code itself still tells the story
        print(f"pfc train: cannot record the exit status in {out}: {e}", file=sys.stderr)


def workers_exit_code(rc: int, status_dir: Path) -> int:
    """The exit code to report for a launcher that returned ``rc``, from its workers' records.

    The same rule as ``pfc_worker_exit`` in launch/lib.sh (tested against it): among the codes
    of the latest round in ``status_dir``, some 75 and otherwise 0 gives 75, all 2 or all 3
    gives that code, anything else (or nothing recorded) keeps ``rc``.
    """
    if rc == 0 or not status_dir.is_dir():
        return rc
    rounds: dict[int, list[int]] = {}
    for f in status_dir.glob("round*.rank*"):
        head = f.name[len("round"):].split(".", 1)[0]
        try:
            code = int(f.read_text().strip())
        except (OSError, ValueError):
            continue
        if head.isdigit():
            rounds.setdefault(int(head), []).append(code)
    codes = set(rounds[max(rounds)]) if rounds else set()
    if 75 in codes and codes <= {0, 75}:
        return 75
    if len(codes) == 1 and codes <= {EXIT_BAD_INPUT, EXIT_DIVERGED}:
        return codes.pop()
    return rc


# ---------------------------------------------------------------------------------------- train
def train_main(argv: Sequence[str]) -> int:
    """``pfc train``: one rank of a training job (torchrun/Slurm set the rank environment)."""
    from .config import ConfigError, add_config_args, config_from_args
    from .trainer import EXIT_PREEMPTED, NonFiniteLossError, run_training

    p = argparse.ArgumentParser(prog="pfc train", description="Train a Partial FC model (one process per rank).")
    add_config_args(p)
    p.add_argument("--no-export", action="store_true", help="skip the backbone export at the end")
    args = p.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ConfigError as e:
        print(f"pfc train: config error: {e}", file=sys.stderr)
        return 2
    try:
        summary = run_training(cfg, export=not args.no_export)
    except _input_errors() as e:
        return _clean_error("pfc train", e, EXIT_BAD_INPUT)
    except NonFiniteLossError as e:
        return _clean_error("pfc train", e, EXIT_DIVERGED)
    if summary.get("preempted"):
        return EXIT_PREEMPTED
    if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0:
        _print_summary(summary)
    return 0


def _print_summary(s: dict) -> None:
    lines = [f"run directory   {s['run_dir']}",
             f"steps           {s['step']}/{s['total_steps']} ({s['skipped_steps']} skipped), "
             f"{s.get('train_seconds', 0):.0f} s"]
    if s.get("final_loss"):
        fl = s["final_loss"]
        lines.append("final loss      " + "  ".join(f"{k} {v:.4f}" for k, v in fl.items()))
    for name, r in (s.get("eval") or {}).items():
        tars = "  ".join(f"TAR@FAR={k}: {v:.4f}" for k, v in r["tar"].items())
        lines.append(f"verification    {name}: accuracy {r['accuracy']:.4f} +- {r['accuracy_std']:.4f}  {tars}")
    exp = s.get("export") or {}
    if exp.get("state_dict"):
        lines.append(f"backbone        {exp['state_dict']}")
    if exp.get("onnx"):
        lines.append(f"ONNX            {exp['onnx']} (max |ORT - torch| {exp['onnx_max_abs_diff']:.1e})")
    if s.get("metrics_url"):
        lines.append(f"metrics         {s['metrics_url']} (served while the run was alive)")
    print("\n".join(lines), flush=True)


# ---------------------------------------------------------------------------------------- data
def synth_config(cfg) -> "object":
    """The ``dali_pipelines.synth_faces.SynthConfig`` that ``cfg.data.synth`` describes."""
    from dali_pipelines.synth_faces import SynthConfig

    s = cfg.data.synth
    return SynthConfig(train_identities=s.identities, images_per_identity=s.images_per_identity,
                       ver_pairs=s.verification_pairs, image_size=s.image_size, seed=s.seed)


def ensure_synthetic_dataset(cfg, *, force: bool = False, progress: bool = True) -> dict:
    """Generates ``cfg.data.synth`` unless an identical dataset is already there.

    The generator's ``identities.json`` records its full config; a directory whose record
    matches is reused, anything else is regenerated (``force`` always regenerates).

    Returns:
        ``{"out_dir", "reused", "seconds", ...}``.
    """
    from dali_pipelines.synth_faces import generate_synthetic_dataset

    sc = synth_config(cfg)
    out = Path(cfg.data.synth.out_dir)
    meta = out / "identities.json"
    want = sc.record()
    if not force and meta.is_file() and (out / "train.idx").is_file():
        try:
            have = json.loads(meta.read_text()).get("config")
        except (OSError, ValueError):
            have = None
        if have == want:
            return {"out_dir": str(out), "reused": True, "seconds": 0.0}
    summary = generate_synthetic_dataset(out, sc, progress=progress)
    summary["reused"] = False
    return summary


def synth_main(argv: Sequence[str]) -> int:
    """``pfc synth``: the recipe's synthetic dataset, or (with ``--out``) any size of it."""
    if "--out" in argv or any(a.startswith("--out=") for a in argv):
        from dali_pipelines.cli import main as data_main

        return data_main(["synth", *argv])
    from .config import ConfigError, add_config_args, config_from_args

    p = argparse.ArgumentParser(
        prog="pfc synth", description="Make the synthetic identity dataset the recipe's [data.synth] describes "
                                      "(or pass --out DIR and sizes for any other; see `python -m dali_pipelines synth -h`).")
    add_config_args(p)
    p.add_argument("--force", action="store_true", help="regenerate even if an identical dataset exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ConfigError as e:
        print(f"pfc synth: config error: {e}", file=sys.stderr)
        return 2
    s = ensure_synthetic_dataset(cfg, force=args.force, progress=not args.no_progress)
    if s["reused"]:
        print(f"[pfc] synthetic dataset up to date in {s['out_dir']}", flush=True)
    else:
        print(f"[pfc] synthetic dataset: {s['train_identities']} identities, {s['train_images']} training images, "
              f"{s['verification_pairs']} verification pairs, {s['cluster_images']} clustering images in "
              f"{s['out_dir']} ({s['seconds']:.1f} s)", flush=True)
    return 0


def pack_main(argv: Sequence[str]) -> int:
    """``pfc pack``: an image folder tree to ``.rec``/``.idx`` (see ``dali_pipelines.pack``)."""
    from dali_pipelines.cli import main as data_main

    return data_main(["pack", *argv])


# ---------------------------------------------------------------------------------------- export
def export_main(argv: Sequence[str]) -> int:
    """``pfc export``: a checkpoint's backbone as a state dict and (optionally) ONNX."""
    from partial_fc.backbones import build_backbone

    from .checkpoint import CheckpointError, export_backbone_state, find_latest
    from .config import load_config
    from .export import check_onnx, export_onnx, export_state_dict

    p = argparse.ArgumentParser(prog="pfc export", description="Export a checkpoint's backbone (no head).")
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint directory (step_*), a checkpoint root, or a run directory")
    p.add_argument("--config", default=None,
                   help="the run's config.toml (default: found in the run directory above the checkpoint)")
    p.add_argument("--out", default=None, help="output directory (default: <run dir>/export)")
    p.add_argument("--onnx", action="store_true", help="also export ONNX and check it with onnxruntime")
    p.add_argument("--opset", type=int, default=18)
    args = p.parse_args(argv)

    ck = Path(args.checkpoint)
    if (ck / "checkpoints").is_dir():  # a run directory
        ck = ck / "checkpoints"
    step_dir = ck if (ck / "manifest.json").is_file() else find_latest(ck)
    if step_dir is None:
        print(f"pfc export: no complete checkpoint under {ck}", file=sys.stderr)
        return 2
    cfg_path = Path(args.config) if args.config else _find_upwards(step_dir, "config.toml")
    if cfg_path is None:
        print(f"pfc export: no config.toml above {step_dir}; pass --config", file=sys.stderr)
        return 2
    cfg = load_config(cfg_path)
    try:
        state = export_backbone_state(step_dir)
    except CheckpointError as e:
        print(f"pfc export: {e}", file=sys.stderr)
        return 2
    b = cfg.backbone
    model = build_backbone(b.name, num_features=b.num_features, dropout=b.dropout)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # a config that does not describe this checkpoint
        first = str(e).strip().splitlines()
        print(f"pfc export: {step_dir} does not fit backbone {b.name!r} with num_features={b.num_features} "
              f"from {cfg_path} ({first[-1].strip() if first else e}); pass the run's --config", file=sys.stderr)
        return 2
    model.eval()
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


def _find_upwards(start: Path, name: str, levels: int = 3) -> Optional[Path]:
    d = start
    for _ in range(levels + 1):
        if (d / name).is_file():
            return d / name
        d = d.parent
    return None


# ---------------------------------------------------------------------------------------- misc
def config_main(argv: Sequence[str]) -> int:
    """``pfc config``: print the resolved config of a recipe with overrides (or list recipes)."""
    from .config import ConfigError, add_config_args, config_from_args, dump_toml, list_recipes

    p = argparse.ArgumentParser(prog="pfc config", description="Print a recipe with overrides applied, as TOML.")
    add_config_args(p)
    p.add_argument("--list", action="store_true", help="list the shipped recipes")
    args = p.parse_args(argv)
    if args.list:
        print("\n".join(list_recipes()))
        return 0
    try:
        print(dump_toml(config_from_args(args)), end="")
    except ConfigError as e:
        print(f"pfc config: {e}", file=sys.stderr)
        return 2
    return 0


def eval_main(argv: Sequence[str]) -> int:
    """``pfc eval``: see ``train.evaluate.cli``."""
    from .evaluate.cli import main

    return main(list(argv))


def plan_main(argv: Sequence[str]) -> int:
    """``pfc plan``: see ``train.plan``."""
    from .plan import main

    return main(list(argv))


def ablate_main(argv: Sequence[str]) -> int:
    """``pfc ablate``: see ``train.ablate``."""
    from .ablate import main

    return main(list(argv))


def demo_main(argv: Sequence[str]) -> int:
    """``pfc demo``: the README's main job on a fresh CPU machine.

    Makes the synthetic dataset, trains the recipe (default ``cpu_demo``: the paper's full
    method s6, DALI CPU decode) on ``--nproc`` ranks under torchrun, which evaluates and exports
    ONNX at the end, and prints where everything is.
    """
    from .config import ConfigError, add_config_args, config_from_args

    p = argparse.ArgumentParser(prog="pfc demo", description="Synthetic data + 2-rank CPU training under torchrun.")
    add_config_args(p)
    p.add_argument("--nproc", type=int, default=2, help="ranks (processes) on this machine")
    p.add_argument("--fresh", action="store_true", help="delete the previous demo run directory first")
    args = p.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ConfigError as e:
        print(f"pfc demo: config error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    if cfg.data.kind != "synthetic":
        s = ensure_synthetic_dataset(cfg)
        how = "reused" if s["reused"] else "made in %.1f s" % s["seconds"]
        print(f"[pfc] dataset {s['out_dir']} ({how})", flush=True)
    if args.fresh and cfg.run_dir.exists():
        import shutil

        shutil.rmtree(cfg.run_dir)
    elif (cfg.checkpoint_dir).exists():
        print(f"[pfc] {cfg.run_dir} has checkpoints: the run resumes from them (pass --fresh to start over)",
              flush=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           "-m", "train", "train"]
    if args.config:
        cmd += ["--config", args.config]
    for o in args.overrides:
        cmd += ["--set", o]
    print("[pfc] running:", " ".join(cmd), flush=True)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="pfc-exit.") as status_dir:
        # torchrun reports any worker failure as 1: the workers' own codes (75 after a
        # checkpoint on a signal, 2, 3) come from their records (see workers_exit_code).
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
                   **{EXIT_STATUS_DIR_ENV: status_dir})
        rc = workers_exit_code(subprocess.call(cmd, env=env), Path(status_dir))
    if rc == 0:
        print(f"[pfc] demo finished in {time.perf_counter() - t0:.0f} s; the run directory (config, logs, "
              f"checkpoints, export, summary.json) is {cfg.run_dir}", flush=True)
    return rc


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "train": train_main,
    "synth": synth_main,
    "pack": pack_main,
    "eval": eval_main,
    "export": export_main,
    "plan": plan_main,
    "config": config_main,
    "ablate": ablate_main,
    "demo": demo_main,
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Dispatches ``pfc <command> [args]``.

    Args:
        argv: Arguments without the program name (``sys.argv[1:]`` when ``None``).

    Returns:
        The process exit code.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        known = ", ".join(COMMANDS)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"pfc: unknown command {argv[0]!r}; commands: {known}", file=sys.stderr)
            return 2
        print(__doc__.split("\n\n", 1)[1] if __doc__ else f"commands: {known}")
        return 0
    if argv[0] != "train":
        return COMMANDS[argv[0]](argv[1:])
    code = 1  # an exception escaping train_main is a crash
    try:
        code = COMMANDS["train"](argv[1:])
    except SystemExit as e:  # argparse: 0 for --help, 2 for bad arguments
        code = e.code if isinstance(e.code, int) else 1
        raise
    finally:
        _record_exit_status(code)
    return code

"""``pfc synth`` and ``pfc pack``: the data layer's commands (dali_pipelines.cli) in the ``pfc`` tree,
plus :func:`ensure_synthetic_dataset` (the recipe's synthetic dataset, reused when up to date).

``pfc synth`` has two forms, told apart by ``--out``:

- recipe form, ``pfc synth [--config RECIPE] [--set data.synth.KEY=VALUE ...] [--force]``: the
  dataset ``[data.synth]`` of the recipe describes, written to ``data.synth.out_dir`` and skipped
  when an identical one is there (what ``pfc train``/``pfc demo`` read);
- explicit form, ``pfc synth --out DIR [--identities N --images N ...]``: any dataset the generator
  can make (``python -m dali_pipelines synth``), always written; prints its summary as JSON.

``--workers`` and ``--no-progress`` go with both. Options of one form given with the other are a
usage error (exit 2) naming them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .verb import UsageError, Verb, add_recipe_arguments

#: Recipe-form options, as (namespace attribute, option string, "was it given").
_RECIPE_OPTIONS = (("config", "--config", lambda v: v is not None), ("overrides", "--set", bool),
                   ("force", "--force", bool))


def synth_config(cfg) -> "object":
    """The ``dali_pipelines.synth_faces.SynthConfig`` that ``cfg.data.synth`` describes."""
    from dali_pipelines.synth_faces import STUDY_OPTIONS, SynthConfig

    s = cfg.data.synth
    return SynthConfig(train_identities=s.identities, images_per_identity=s.images_per_identity,
                       ver_pairs=s.verification_pairs, image_size=s.image_size, seed=s.seed,
                       **{key: getattr(s, key) for key in STUDY_OPTIONS})


def ensure_synthetic_dataset(cfg, *, force: bool = False, progress: bool = True, workers=None) -> dict:
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
    summary = generate_synthetic_dataset(out, sc, progress=progress, workers=workers)
    summary["reused"] = False
    return summary


# ---------------------------------------------------------------------------------------- synth
def add_synth_arguments(p: argparse.ArgumentParser) -> None:
    """Both forms' options; the explicit form's default to None here so that run() sees which were given."""
    from dali_pipelines.cli import add_synth_arguments as add_explicit, add_synth_shared_arguments

    recipe = add_recipe_arguments(p, "recipe form (the recipe's [data.synth], skipped when up to date)")
    recipe.add_argument("--force", action="store_true", help="regenerate even if an identical dataset exists")
    explicit = p.add_argument_group("explicit form (--out DIR and any size; always written, JSON summary)")
    add_explicit(explicit, out_required=False, shared=False)
    defaults = {}
    for action in explicit._group_actions:
        defaults[action.dest] = (action.option_strings[0], action.default)
        if action.default is not None and "default" not in (action.help or ""):
            shown = " ".join(map(str, action.default)) if isinstance(action.default, tuple) else action.default
            action.help = f"{action.help} (default {shown})"
        action.default = None
    p.set_defaults(synth_explicit_defaults=defaults)
    add_synth_shared_arguments(p.add_argument_group("both forms"))


def check_synth_form(args: argparse.Namespace) -> str:
    """``"explicit"`` or ``"recipe"``; fills in the explicit form's defaults.

    Raises:
        UsageError: Options of both forms, or explicit-form sizes without ``--out``.
    """
    defaults = args.synth_explicit_defaults
    explicit = [opt for dest, (opt, _) in defaults.items() if dest != "out" and getattr(args, dest) is not None]
    recipe = [opt for dest, opt, given in _RECIPE_OPTIONS if given(getattr(args, dest))]
    if args.out is not None and recipe:
        raise UsageError(f"--out DIR (the explicit form) does not go with recipe-form options ({', '.join(recipe)}): "
                         "either name every size on the command line with --out, or use the recipe with "
                         "--set data.synth.KEY=VALUE (its directory is data.synth.out_dir)")
    if args.out is None and explicit:
        raise UsageError(f"explicit-form options ({', '.join(explicit)}) need --out DIR; the recipe "
                         "form takes its sizes from [data.synth] (--set data.synth.identities=N, ...)")
    for dest, (_, default) in defaults.items():
        if getattr(args, dest) is None:
            setattr(args, dest, default)
    return "explicit" if args.out is not None else "recipe"


def run_synth(args: argparse.Namespace) -> int:
    """Runs either form of ``pfc synth`` (see the module doc); 0 done, 2 bad config or input."""
    import sys

    if check_synth_form(args) == "explicit":
        from dali_pipelines.cli import run_synth as run_explicit

        return run_explicit(args)
    from ..config import ConfigError, config_from_args

    try:
        cfg = config_from_args(args)
    except ConfigError as e:
        print(f"pfc synth: config error: {e}", file=sys.stderr)
        return 2
    s = ensure_synthetic_dataset(cfg, force=args.force, progress=not args.no_progress, workers=args.workers)
    if s["reused"]:
        print(f"[pfc] synthetic dataset up to date in {s['out_dir']}", flush=True)
    else:
        print(f"[pfc] synthetic dataset: {s['train_identities']} identities, {s['train_images']} training images, "
              f"{s['verification_pairs']} verification pairs, {s['cluster_images']} clustering images in "
              f"{s['out_dir']} ({s['seconds']:.1f} s)", flush=True)
    return 0


# ---------------------------------------------------------------------------------------- pack
def add_pack_arguments(p: argparse.ArgumentParser) -> None:
    from dali_pipelines.cli import add_pack_arguments as add

    add(p)


def run_pack(args: argparse.Namespace) -> int:
    from dali_pipelines.cli import run_pack as run

    return run(args)


VERBS = (
    Verb("synth", help="make the synthetic identity dataset: the recipe's [data.synth], or --out DIR and any size",
         description="Make the synthetic identity dataset, in one of two forms. Recipe form (no --out): the "
                     "dataset the recipe's [data.synth] describes, in data.synth.out_dir, skipped when an "
                     "identical one is there. Explicit form (--out DIR): any size the generator can make, always "
                     "written, summary printed as JSON. Options of one form do not go with the other.",
         examples=("pfc synth --config cpu_demo",
                   "pfc synth --config cpu_demo --set data.synth.identities=50 --force",
                   "pfc synth --out data/tiny --identities 20 --images 4 --ver-pairs 100",
                   "pfc synth --out data/hard --family-size 4 --sizes powerlaw --probe-images 4 --size 56"),
         add_arguments=add_synth_arguments, run=run_synth),
    Verb("pack", help="image folders (one per identity) -> RecordIO .rec/.idx or shards; --verify a packed dataset",
         description="Pack ROOT/<identity>/<images> into RecordIO (one .rec/.idx, or --shards N plus a manifest). "
                     "Re-running the same command resumes an interrupted pack. --verify DATASET re-reads every "
                     "record header of a packed .rec or shard manifest. Exit codes: 0 ok, 1 nothing packed or "
                     "a problem found, 2 bad input, 130 interrupted.",
         examples=("pfc pack /data/webface42m /data/wf42m/train --shards 64",
                   "pfc pack --verify /data/wf42m/train.json"),
         add_arguments=add_pack_arguments, run=run_pack),
)

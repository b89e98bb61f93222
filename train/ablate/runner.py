"""Running a study: one run's config and fingerprint, training and evaluating it (or reusing its
finished result), and the loop over every variant x seed, serial or in spawned worker processes.

Runs are resumable: each finished run writes ``result.json`` next to its logs with a fingerprint
of everything that decides its outcome (config without paths, dataset, protocol); a later
invocation reuses a run whose fingerprint matches (:func:`finished_result`) and re-trains any
other. The fingerprint must not change for a finished run, or every finished study is re-trained.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from .data import EvalData, ensure_dataset, make_eval_data
from .protocol_v1 import evaluate_run
from .report import atomic_write, machine, metric_columns, write_figure, write_report
from .spec import PROTOCOL, StudySpec, Variant

__all__ = ["run_config", "fingerprint", "finished_result", "train_and_evaluate", "run_study"]

# Config keys added after the first study, dropped from a run's fingerprint while at their
# default, so the first study's finished runs stay reusable.
_LATER_DEFAULTS = {("data", "image_size"): 112, ("head", "phi_count_norm"): "log", ("head", "phi_shuffle"): "none",
                   ("head", "phi_refresh"): "online", ("checkpoint", "async_save"): True,
                   ("checkpoint", "keep_best"): "", ("checkpoint", "keep_best_mode"): "max",
                   ("model", "init_from"): ""}
# The test bed's keys of [data.synth] (dali_pipelines.synth_faces.STUDY_OPTIONS) came later too;
# runs read data.train_rec, and the dataset's own settings are in the fingerprint's "dataset".
# Sections added after the first study; dropped from the fingerprint while all their keys are at
# their defaults (above), so that its finished runs stay reusable.
_LATER_SECTIONS = ("model",)


# ------------------------------------------------------------------------------------ one run
def fingerprint(cfg_dict: Mapping[str, Any], spec: StudySpec) -> str:
    """Hash of what decides a run's result: its config (without paths), the dataset, the protocol.

    Args:
        cfg_dict: :func:`train.config.config_to_dict` of the run's config.

    Returns:
        16 hex digits (``result.json``'s ``fingerprint``).
    """
    c = json.loads(json.dumps(cfg_dict, default=str))
    c.get("run", {}).pop("output_dir", None)
    c.get("data", {}).pop("train_rec", None)
    c.get("data", {}).get("synth", {}).pop("out_dir", None)
    from dali_pipelines.synth_faces import STUDY_OPTIONS

    from ..config import SynthDataConfig

    later = dict(_LATER_DEFAULTS)
    later.update({("data.synth", f.name): f.default for f in dataclasses.fields(SynthDataConfig)
                  if f.name in STUDY_OPTIONS})
    for (section, key), default in later.items():
        table = c
        for part in section.split("."):
            table = table.get(part, {})
        if table.get(key, default) == default:
            table.pop(key, None)
    for section in _LATER_SECTIONS:
        if c.get(section) == {}:
            c.pop(section)
    payload = {"config": c, "dataset": spec.synth_config().record(), "protocol": PROTOCOL,
               "fars": list(spec.far_targets)}
    if spec.protocol != PROTOCOL:
        payload.update(protocol=spec.protocol, max_impostors=spec.max_impostors, curve=spec.curve_every_epochs)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def run_config(spec: StudySpec, variant: Variant, seed: int, runs_dir: Path, data_dir: Path):
    """The :class:`train.config.TrainConfig` of one run (recipe + study + user + variant settings)."""
    from ..config import load_config

    sets = [*spec.study_sets(), *spec.overrides,
            f"data.train_rec={json.dumps(str(data_dir / 'train.rec'))}",
            f"run.output_dir={json.dumps(str(runs_dir))}", f"run.name={variant.slug}__seed{seed}",
            f"run.seed={seed}", f"head.seed={seed}", f"head.method={variant.method}", *variant.overrides]
    return load_config(spec.recipe, sets)


def finished_result(spec: StudySpec, variant: Variant, seed: int, runs_dir: Path, data_dir: Path
                    ) -> Optional[dict[str, Any]]:
    """The saved result of a run whose fingerprint matches its current config, else ``None``."""
    from ..config import config_to_dict

    cfg = run_config(spec, variant, seed, runs_dir, data_dir)
    path = cfg.run_dir / "result.json"
    if not path.is_file():
        return None
    try:
        old = json.loads(path.read_text())
    except ValueError:
        return None
    if old.get("fingerprint") != fingerprint(config_to_dict(cfg), spec):
        return None
    return dict(old, reused=True)


def _fit_and_evaluate(trainer, spec: StudySpec, cfg, data, seed: int) -> tuple[dict, float, dict, dict[str, Any]]:
    """Trains ``trainer`` and evaluates it with the spec's protocol.

    Returns:
        ``(fit summary, seconds at the end of training, metrics, extra result keys)``.
    """
    if spec.protocol == "study-v2":
        from .protocol_v2 import StudyHooks, evaluate_study_run

        hooks = StudyHooks(trainer, data, offline=cfg.head.phi_refresh == "offline",
                           curve_every=spec.curve_every_epochs, fars=spec.far_targets,
                           max_impostors=spec.max_impostors, seed=seed)
        summary = trainer.fit(on_step=hooks)
        t1 = time.perf_counter()
        extra = evaluate_study_run(trainer, data, hooks, seed=seed, fars=spec.far_targets,
                                   max_impostors=spec.max_impostors)
        metrics = extra.pop("metrics")
        extra["steps_per_epoch"] = hooks.spe
        return summary, t1, metrics, extra
    summary = trainer.fit()
    t1 = time.perf_counter()
    metrics = evaluate_run(trainer.engine.module, data, seed=seed, fars=spec.far_targets,
                           batch_size=cfg.evaluation.batch_size)
    return summary, t1, metrics, {}


def train_and_evaluate(spec: StudySpec, variant: Variant, seed: int, runs_dir: Path, data_dir: Path,
                       get_data: Callable[[], EvalData]) -> dict[str, Any]:
    """One run, or its earlier result when the fingerprint matches.

    ``get_data`` returns the decoded held-out splits; it is only called when the run is trained,
    so a study whose runs are all reused decodes nothing.
    """
    import torch

    from ..config import config_to_dict
    from ..logging_utils import teardown_logging
    from ..trainer import Trainer

    done = finished_result(spec, variant, seed, runs_dir, data_dir)
    if done is not None:
        return done
    cfg = run_config(spec, variant, seed, runs_dir, data_dir)
    fp = fingerprint(config_to_dict(cfg), spec)
    if cfg.run_dir.exists():  # unfinished, or made with other settings: start over
        shutil.rmtree(cfg.run_dir)
    data = get_data()
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    trainer = Trainer(cfg, handle_signals=False)
    try:
        summary, t1, metrics, extra = _fit_and_evaluate(trainer, spec, cfg, data, seed)
    finally:
        trainer.close()
        teardown_logging()
    t2 = time.perf_counter()
    result = {
        "variant": variant.label, "method": variant.method, "overrides": list(variant.overrides), "seed": seed,
        "fingerprint": fp, "metrics": metrics, "final_loss": summary.get("final_loss"),
        "steps": summary["step"], "skipped_steps": summary["skipped_steps"],
        "wall_s": round(t2 - t0, 2), "train_s": round(t1 - t0, 2), "eval_s": round(t2 - t1, 2),
        "torch_threads": torch.get_num_threads(), "pid": os.getpid(),
        "loadavg_1m": [round(load0, 2), round(os.getloadavg()[0], 2)], "run_dir": str(cfg.run_dir),
        **extra,
    }
    atomic_write(cfg.run_dir / "result.json", json.dumps(result, indent=2))
    return dict(result, reused=False)


# ------------------------------------------------------------------------------------ workers
# Worker processes of `--jobs N` (spawned): each decodes the held-out splits once and keeps them.
_WORKER: dict[str, Any] = {}


def _worker_init(threads: int, data_dir: str, spec: Optional[StudySpec] = None) -> None:
    import torch

    torch.set_num_threads(threads)
    _WORKER["data_dir"] = data_dir
    _WORKER["spec"] = spec or StudySpec()


def _worker_data():
    if "data" not in _WORKER:
        _WORKER["data"] = make_eval_data(_WORKER["spec"], Path(_WORKER["data_dir"]))
    return _WORKER["data"]


def _worker_run(spec: StudySpec, variant: Variant, seed: int, runs_dir: str, data_dir: str) -> dict[str, Any]:
    return train_and_evaluate(spec, variant, seed, Path(runs_dir), Path(data_dir), _worker_data)


def _train_serial(spec: StudySpec, tasks, todo: Sequence[int], runs_dir: Path, data_dir: Path,
                  threads: Optional[int], record: Callable[[int, dict], None]) -> None:
    """Trains the ``todo`` tasks one after the other in this process (held-out data decoded once)."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    cache: list = []

    def get_data():
        if not cache:
            cache.append(make_eval_data(spec, data_dir))
        return cache[0]

    for i in todo:
        v, seed = tasks[i]
        record(i, train_and_evaluate(spec, v, seed, runs_dir, data_dir, get_data))


def _train_parallel(spec: StudySpec, tasks, todo: Sequence[int], runs_dir: Path, data_dir: Path, jobs: int,
                    threads: Optional[int], record: Callable[[int, dict], None]) -> None:
    """Trains the ``todo`` tasks in ``jobs`` spawned processes, recording each as it finishes."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=mp.get_context("spawn"),
                             initializer=_worker_init, initargs=(threads or 1, str(data_dir), spec)) as pool:
        futures = {pool.submit(_worker_run, spec, tasks[i][0], tasks[i][1], str(runs_dir), str(data_dir)): i
                   for i in todo}
        for f in as_completed(futures):
            record(futures[f], f.result())


# ------------------------------------------------------------------------------------ the study
def _progress_line(n_done: int, n_tasks: int, variant: Variant, seed: int, r: Mapping[str, Any], protocol: str) -> str:
    m = r["metrics"]
    shown = ("acc", "tar_1e-3", "hard_acc", "nmi", "bcubed_f") if protocol == PROTOCOL else (
        "tar_1e-3", "tar_1e-4", "fa_lookalike_1e-4", "probe_top1", "nmi", "phi_logz_rho")
    return (f"[ablate] {n_done}/{n_tasks} {variant.label} seed {seed}: "
            + " ".join(f"{k} {m.get(k, math.nan):.4f}" for k in shown) + " "
            + ("(reused)" if r["reused"] else f"({r['wall_s']:.0f} s, load {r['loadavg_1m'][0]:.1f})"))


def _write_figures(result: dict[str, Any], spec: StudySpec, out: Path) -> None:
    """``ablation.png`` (and ``curves.png`` for ``study-v2``), named in ``results.json``."""
    fig = write_figure(result["aggregate"], out / "ablation.png", metric_columns(spec.protocol))
    if fig is not None:
        result["figure"] = str(fig)
    if spec.protocol == "study-v2":
        from .protocol_v2 import write_curve_figure

        curve = write_curve_figure(result["runs"], out / "curves.png")
        if curve is not None:
            result["curve_figure"] = str(curve)
        from .forest import write_forest_figure

        forest = write_forest_figure(result.get("study", {}).get("paired", {}), out / "differences.png")
        if forest is not None:
            result["differences_figure"] = str(forest)
    atomic_write(out / "results.json", json.dumps(result, indent=1, default=float))


def run_study(spec: StudySpec, variants: Sequence[Variant], seeds: Sequence[int], out: Path, *,
              runs_dir: Optional[Path] = None, data_dir: Optional[Path] = None, figure: bool = True,
              command: str = "", jobs: int = 1, threads: Optional[int] = None,
              order: str = "seed", train: bool = True) -> dict[str, Any]:
    """Trains and evaluates every variant x seed; writes ``results.json`` and ``table.md`` in ``out``.

    By default runs go seed by seed (every variant of seed 0 first), so an interrupted study still
    has complete seeds; ``order="variant"`` finishes every seed of a variant before the next one
    (useful to get the first variants listed to all seeds first when time is short).
    ``results.json`` and ``table.md`` are rewritten after every run.

    Args:
        jobs: Runs trained at once, each in its own spawned process. On a small shared CPU two
            single-threaded processes use the cores better than one two-threaded process, whose
            threads wait for each other at every operator.
        threads: Torch threads per worker process (default: 1 with ``jobs > 1``, else torch's).
        order: ``"seed"`` or ``"variant"``: which loop is the outer one.
        train: ``False`` only collects finished runs (the others are listed as ``missing``) and
            writes the report: the tables of a study that was stopped early.

    Returns:
        The content of ``results.json``.
    """
    out.mkdir(parents=True, exist_ok=True)
    runs_dir = (runs_dir or out / "runs").resolve()
    data_dir = (data_dir or out / "data").resolve()
    t0 = time.perf_counter()
    ds = ensure_dataset(spec, data_dir)
    print(f"[ablate] dataset {data_dir} ({'reused' if ds['reused'] else 'made in %.1f s' % ds['seconds']})",
          flush=True)
    study = {
        "command": command, "spec": dataclasses.asdict(spec), "protocol": PROTOCOL, "machine": machine(),
        "variants": [v.label for v in variants], "seeds": list(seeds), "data_dir": str(data_dir),
        "jobs": jobs, "threads_per_job": threads, "order": order, "dataset_seconds": ds.get("seconds", 0.0),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "loadavg_start": list(os.getloadavg()),
    }
    if order not in ("seed", "variant"):
        raise ValueError(f"order must be 'seed' or 'variant', got {order!r}")
    tasks = [(v, s) for s in seeds for v in variants] if order == "seed" else [(v, s) for v in variants for s in seeds]
    done: dict[int, dict[str, Any]] = {}
    state: dict[str, Any] = {}

    def record(i: int, r: dict[str, Any]) -> None:
        done[i] = r
        print(_progress_line(len(done), len(tasks), *tasks[i], r, spec.protocol), flush=True)
        state["result"] = write_report(out, study, [done[j] for j in sorted(done)], protocol=spec.protocol,
                                       wall_s=time.perf_counter() - t0)

    todo = []
    for i, (v, seed) in enumerate(tasks):
        r = finished_result(spec, v, seed, runs_dir, data_dir)
        if r is not None:
            record(i, r)
        else:
            todo.append(i)
    state.setdefault("result", dict(study, runs=[], aggregate={}))
    if not train:
        state["result"]["missing"] = [{"variant": tasks[i][0].label, "seed": tasks[i][1]} for i in todo]
        atomic_write(out / "results.json", json.dumps(state["result"], indent=1, default=float))
        todo = []
    if todo and jobs <= 1:
        _train_serial(spec, tasks, todo, runs_dir, data_dir, threads, record)
    elif todo:
        _train_parallel(spec, tasks, todo, runs_dir, data_dir, jobs, threads, record)
    result = state["result"]
    if figure and result["aggregate"]:
        _write_figures(result, spec, out)
    return result

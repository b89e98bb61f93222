"""The steps of ``benchmarks/gpu_check.sh``: a first look at a machine with one NVIDIA GPU.

Each step is one process (``python benchmarks/gpu_check.py step NAME --out DIR [--dry-run]``) that
writes ``DIR/steps/NAME.json``; ``summary`` then writes ``DIR/gpu_check.json`` and
``DIR/gpu_check.md``. The shell script runs the steps with time limits, so one hung or crashed step
costs its own limit and shows as such in the summary, and the rest still run.

Steps (goals are for one H100/H200; each figure is printed next to its goal, pass or fail):

* ``tests``: the suite's CUDA tests (``pytest -m gpu``: ``tests/gpu`` and every test marked gpu).
* ``parity``: the head on CUDA against the fp64 CPU dense reference (``tests/reference.py``), fp32
  and bf16 autocast: loss, embedding and weight gradients; plus s6 on CUDA against s6 on CPU.
* ``head``: our head step against the reference Partial FC v2 design at 2,059,906 classes, one
  emulated rank of 8 (257,488 classes, global batch 1,024), sample rates 0.1 and 0.3, batch 128
  per rank, timed with CUDA events, memory from ``torch.cuda.max_memory_allocated``. Goals: time
  <= 0.7x and memory <= 0.6x the reference's.
* ``train_r50``, ``train_r100``: ``benchmarks/bench_train.py``, bf16 + channels-last, synthetic
  batches of 128 on the device, MS1MV3's 93,431 classes. Goals: r50 >= 5,000 and r100 >= 2,600
  images/s; the fraction of the device's peak is reported.
* ``loader``: the PyTorch fallback loader's JPEG decode throughput with all CPU cores (DALI is
  optional and not needed; whether it is installed is reported).
* ``syncs``: a few training steps under ``torch.cuda.set_sync_debug_mode("warn")``: every
  synchronising CUDA call of an ordinary step, by place, next to the documented list
  (``train/host_syncs.py``); the Python-level reads are counted too and must all be documented.

``--dry-run`` runs every step at toy size on the CPU (what ``tests/unit/test_gpu_check.py`` does),
so the script is known to work before a GPU is available.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STEPS = ("tests", "parity", "head", "train_r50", "train_r100", "loader", "syncs")
HEAD_CLASSES, HEAD_WORLD, HEAD_BATCH, HEAD_RATES = 2_059_906, 8, 128, (0.1, 0.3)
GOALS = {
    "head_time_ratio": 0.7,   # our step time / the reference design's, at most
    "head_mem_ratio": 0.6,    # our peak memory / the reference design's, at most
    "r50_images_per_s": 5000.0,
    "r100_images_per_s": 2600.0,
}


def _device(dry: bool) -> str:
    import torch

    if dry:
        return "cpu"
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible (torch.cuda.is_available() is False); use --dry-run on a CPU")
    return "cuda"


def _run(cmd: list[str], timeout: float, log: Path) -> int:
    """Runs ``cmd`` with the repository on PYTHONPATH; its output goes to ``log``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    with open(log, "w") as fh:
        try:
            return subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            fh.write(f"\n[gpu_check] timed out after {timeout:.0f} s\n")
            return 124


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# ------------------------------------------------------------------------------------------------ steps
def step_tests(out: Path, dry: bool) -> dict:
    """``pytest -m gpu`` over the suite (dry run: only the GPU test files, which skip on a CPU).

    Modules that cannot even be imported on the machine (an optional dependency such as DALI is
    missing) are listed, not failed: their tests are not GPU tests unless marked so.
    """
    import xml.etree.ElementTree as ET

    xml = out / "steps" / "tests_junit.xml"
    paths = ["tests/gpu", "tests/unit/test_metrics.py"] if dry else ["tests"]
    cmd = [sys.executable, "-m", "pytest", *paths, "-m", "gpu", "-q", "-p", "no:cacheprovider",
           "--continue-on-collection-errors", f"--junitxml={xml}", "-o", "addopts=-ra --strict-markers"]
    rc = _run(cmd, 400, out / "steps" / "tests_pytest.log")
    figures: dict[str, Any] = {"command": " ".join(cmd[2:]), "exit_code": rc, "passed": 0, "failed": [],
                               "skipped": 0, "not_collected": []}
    try:
        for case in ET.parse(xml).getroot().iter("testcase"):
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            err = case.find("error")
            if err is not None and "collection failure" in (err.get("message") or ""):
                figures["not_collected"].append(case.get("classname") or case.get("name"))
            elif case.find("failure") is not None or err is not None:
                figures["failed"].append(name)
            elif case.find("skipped") is not None:
                figures["skipped"] += 1
            else:
                figures["passed"] += 1
    except (OSError, ET.ParseError) as e:
        figures["junit_error"] = str(e)
    ok = "junit_error" not in figures and not figures["failed"]
    if not dry and not figures["passed"]:
        ok = False  # on a GPU machine the CUDA tests must actually run
    return {"status": "pass" if ok else "fail", "figures": figures,
            "log_tail": "" if ok else _tail(out / "steps" / "tests_pytest.log")}


def _rel(a, b) -> float:
    """max |a - b| / max |b| (both moved to fp64 CPU)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _cos(a, b) -> float:
    import torch.nn.functional as F

    a, b = a.detach().double().cpu().flatten(), b.detach().double().cpu().flatten()
    return float(F.cosine_similarity(a, b, dim=0))


def step_parity(out: Path, dry: bool) -> dict:
    """The head on the device vs the dense fp64 CPU reference, fp32 and bf16 autocast."""
    import torch

    from partial_fc import PartialFCHead
    from tests import reference as ref

    dev = torch.device(_device(dry))
    classes, dim, batch = (300, 32, 16) if dry else (20_000, 512, 256)
    margins = {"arcface": (1.0, 0.5, 0.0), "cosface": (1.0, 0.0, 0.4)}
    rows, ok = [], True
    g = torch.Generator().manual_seed(0)
    emb64 = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    labels = torch.randint(0, classes, (batch,), generator=g)
    for method, (m1, m2, m3) in margins.items():
        head = PartialFCHead(num_classes=classes, embedding_size=dim, method=method, s=64.0,
                             embedding_grad="exact", row_update="dense", device=dev)
        w64 = head.weight.detach().double().cpu().requires_grad_()
        e_ref = emb64.clone().requires_grad_()
        loss_ref = ref.margin_ce(e_ref, w64, labels, m1, m2, m3, 64.0)
        loss_ref.backward()
        for dtype in ("fp32", "bf16"):
            head.weight.grad = None
            emb = emb64.float().to(dev).requires_grad_()
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
                out_ = head(emb, labels.to(dev))
            out_["loss"].backward()
            r = dict(method=method, dtype=dtype, loss=float(out_["loss"]), loss_ref=float(loss_ref),
                     loss_rel_err=abs(float(out_["loss"]) - float(loss_ref)) / abs(float(loss_ref)),
                     emb_grad_rel_err=_rel(emb.grad, e_ref.grad), weight_grad_rel_err=_rel(head.weight.grad, w64.grad),
                     emb_grad_cos=_cos(emb.grad, e_ref.grad), weight_grad_cos=_cos(head.weight.grad, w64.grad))
            if dtype == "fp32":  # fp32 against fp64: rounding only
                r["pass"] = r["loss_rel_err"] < 1e-4 and r["emb_grad_rel_err"] < 1e-3 and r["weight_grad_rel_err"] < 1e-3
                r["criterion"] = "loss rel err < 1e-4, gradient rel err < 1e-3"
            else:  # bf16 scores: 8 mantissa bits; the direction of the gradients must hold
                r["pass"] = r["loss_rel_err"] < 3e-2 and r["emb_grad_cos"] > 0.99 and r["weight_grad_cos"] > 0.99
                r["criterion"] = "loss rel err < 3e-2, gradient cosine > 0.99"
            ok &= r["pass"]
            rows.append(r)
    # s6 (bank, concentration, contrastive, aligning) on the device vs the same code on the CPU, fp32,
    # over three steps (the bank and the phi statistics fill up): sample_rate 1, so no sampling RNG.
    heads = {d: PartialFCHead(num_classes=classes, embedding_size=dim, method="s6", sample_rate=1.0,
                              margin_warmup_steps=1, row_update="dense", device=torch.device(d))
             for d in ("cpu", dev.type)}
    outs = {}
    for d, head in heads.items():
        for step in range(3):
            emb = torch.randn(batch, dim, generator=torch.Generator().manual_seed(step)).to(d).requires_grad_()
            lab = torch.randint(0, classes // 4, (batch,), generator=torch.Generator().manual_seed(100 + step)).to(d)
            o = head(emb, lab)
            o["loss"].backward()
        outs[d] = ({k: float(v) for k, v in o.items()}, emb.grad.detach().cpu())
    (lc, gc), (ld, gd) = outs["cpu"], outs[dev.type]
    r = dict(method="s6 (device vs CPU, step 3)", dtype="fp32", losses_cpu=lc, losses_device=ld,
             loss_rel_err=max(abs(ld[k] - lc[k]) / max(abs(lc[k]), 1e-12) for k in lc),
             emb_grad_rel_err=_rel(gd, gc), criterion="every loss term and the embedding gradient within 1e-3")
    r["pass"] = r["loss_rel_err"] < 1e-3 and r["emb_grad_rel_err"] < 1e-3
    ok &= r["pass"]
    rows.append(r)
    return {"status": "pass" if ok else "fail", "figures": {"device": str(dev), "classes": classes, "dim": dim,
                                                              "batch": batch, "rows": rows}}


def step_head(out: Path, dry: bool) -> dict:
    """Our head step vs the reference design, one emulated rank of 8 at 2,059,906 classes."""
    from benchmarks.head_step import device_steps

    device = _device(dry)
    classes, dim, batch, steps, warmup = (8_000, 32, 4, 1, 1) if dry else (HEAD_CLASSES, 512, HEAD_BATCH, 10, 3)
    rows, ok = [], True
    for rate in HEAD_RATES:
        res = {d: device_steps(d, classes, dim, rate, batch, steps, warmup, emulate_world=HEAD_WORLD, device=device)
               for d in ("reference", "ours_arcface", "ours_s6")}
        ref = res["reference"]
        for d, r in res.items():
            row = dict(rate=rate, design=d, step_ms=round(r["step_ms"], 3), peak_mib=round(r["peak_bytes"] / 2**20, 1),
                       state_mib=round(r["state_bytes"] / 2**20, 1), loss=r["loss"])
            if d != "reference":
                row["time_ratio"] = round(r["step_ms"] / ref["step_ms"], 3)
                row["mem_ratio"] = round(r["peak_bytes"] / ref["peak_bytes"], 3)
            if d == "ours_arcface":  # the like-for-like comparison (same loss) carries the goals
                row["time_goal"] = f"<= {GOALS['head_time_ratio']}x"
                row["mem_goal"] = f"<= {GOALS['head_mem_ratio']}x"
                if not dry:  # toy sizes on a CPU say nothing about the goals
                    row["pass"] = (row["time_ratio"] <= GOALS["head_time_ratio"]
                                   and row["mem_ratio"] <= GOALS["head_mem_ratio"])
                    ok &= row["pass"]
            rows.append(row)
    return {"status": ("pass" if ok else "fail") if not dry else "info",
            "figures": {"device": device, "classes": classes, "emulated_world": HEAD_WORLD,
                        "shard_classes": res["reference"]["shard_classes"], "batch_per_rank": batch,
                        "global_batch": res["reference"]["global_batch"], "dim": dim, "steps": steps,
                        "warmup": warmup, "timing": "CUDA events" if device == "cuda" else "wall clock",
                        "memory": "torch.cuda.max_memory_allocated - allocated before" if device == "cuda"
                        else "state bytes (CPU dry run)", "rows": rows}}


def _step_train(out: Path, dry: bool, backbone: str) -> dict:
    result = out / "steps" / f"bench_train_{backbone}.json"
    if dry:
        args = ["--config", "cpu_demo", "--backbone", "iresnet_nano", "--device", "cpu", "--batch", "8",
                "--steps", "2", "--warmup", "1", "--synth-identities", "20", "--synth-images", "8"]
    else:
        args = ["--config", f"ms1mv3_{backbone}", "--backbone", backbone, "--device", "cuda", "--batch", "128",
                "--steps", "30", "--warmup", "10", "--synth-identities", "93431", "--synth-images", "2"]
    cmd = [sys.executable, "benchmarks/bench_train.py", *args, "--dtype", "bf16", "--channels-last",
           "--data-kind", "synthetic", "--workdir", str(out / "work" / backbone), "--out", str(result)]
    rc = _run(cmd, 300, out / "steps" / f"bench_train_{backbone}.log")
    if rc != 0 or not result.is_file():
        return {"status": "error", "figures": {"command": " ".join(cmd[1:]), "exit_code": rc},
                "log_tail": _tail(out / "steps" / f"bench_train_{backbone}.log")}
    r = json.loads(result.read_text())
    goal = GOALS[f"{backbone}_images_per_s"]
    figures = {k: r.get(k) for k in ("device", "backbone", "dtype", "channels_last", "batch_per_device",
                                     "steps_timed", "step_s_median", "images_per_s_per_device",
                                     "achieved_tflops", "peak_tflops", "fraction_of_peak", "head_method")}
    figures.update(command=" ".join(cmd[1:]), goal_images_per_s=goal)
    if dry:
        return {"status": "info", "figures": figures}
    passed = r["images_per_s_per_device"] >= goal
    return {"status": "pass" if passed else "fail", "figures": figures}


def step_loader(out: Path, dry: bool) -> dict:
    """The fallback loader's decode throughput with all CPU cores (bench_loader.py)."""
    from dali_pipelines.dali import dali_available

    cpus = os.cpu_count() or 1
    result = out / "steps" / "bench_loader.json"
    if dry:
        args = ["--synth-identities", "8", "--synth-images", "8", "--batch-size", "16", "--batches", "3",
                "--warmup", "1", "--workers", "2"]
    else:
        args = ["--synth-identities", "200", "--synth-images", "25", "--batch-size", "128", "--batches", "30",
                "--warmup", "5", "--workers", str(cpus)]
    cmd = [sys.executable, "benchmarks/bench_loader.py", *args, "--repeats", "1", "--decoders", "simplejpeg",
           "--skip", "pil", "dali", "dali-native", "gpu", "--json", str(result)]
    rc = _run(cmd, 300, out / "steps" / "bench_loader.log")
    if rc != 0 or not result.is_file():
        return {"status": "error", "figures": {"command": " ".join(cmd[1:]), "exit_code": rc},
                "log_tail": _tail(out / "steps" / "bench_loader.log")}
    r = json.loads(result.read_text())["results"]
    best = max(r, key=lambda x: x["img_per_s"])
    return {"status": "info", "figures": {"command": " ".join(cmd[1:]), "cpus": cpus, "dali_installed": dali_available(),
                                          "loader": best["name"], "images_per_s": best["img_per_s"],
                                          "images_per_cpu_s": best["img_per_cpu_s"], "images": best["images"]}}


def step_syncs(out: Path, dry: bool) -> dict:
    """Synchronising calls of ordinary training steps: CUDA's own report and the Python reads."""
    import torch

    from train.config import load_config
    from train.host_syncs import STEP_HOST_SYNCS, check_counts, count_host_reads
    from train.trainer import Trainer

    device = _device(dry)
    first, last, total = 3, 5, 6  # steps 3..5 are ordinary (no log, no checkpoint, no evaluation)
    sets = {"run.output_dir": json.dumps(str(out / "work" / "syncs")), "run.name": '"syncs"',
            "run.max_steps": total, "run.log_every": 100, "run.device": json.dumps(device),
            "data.kind": '"synthetic"', "data.train_rec": '""', "data.batch_size": 8 if dry else 64,
            "data.synth.identities": 20 if dry else 2000, "data.synth.images_per_identity": 8,
            "checkpoint.resume": '"none"', "checkpoint.every_steps": 0, "evaluation.bin_files": "[]",
            "evaluation.every_steps": 0, "metrics.prometheus": "false", "metrics.progress_bar": "false",
            "export.onnx": "false", "precision.dtype": '"fp32"' if dry else '"bf16"'}
    cfg = load_config("cpu_demo", [f"{k}={v}" for k, v in sets.items()])
    trainer = Trainer(cfg, handle_signals=False)
    cuda_sites: collections.Counter = collections.Counter()
    root = str(ROOT)
    active = [False]

    def on_warning(message, category, filename, lineno, file=None, line=None):
        if not active[0] or "synchroniz" not in str(message):
            return
        for fr in reversed(traceback.extract_stack()[:-1]):
            path = str(Path(fr.filename).resolve())
            if path.startswith(root + "/") and "gpu_check" not in path:
                cuda_sites[f"{Path(path).relative_to(ROOT)}:{fr.lineno} ({fr.name})"] += 1
                return
        cuda_sites[f"{filename}:{lineno}"] += 1

    try:
        with count_host_reads() as counter, warnings.catch_warnings():
            warnings.simplefilter("always")
            shown = warnings.showwarning
            warnings.showwarning = on_warning
            try:
                def on_step(step, _images):
                    on = first - 1 <= step < last
                    counter.active = active[0] = on
                    if device == "cuda":
                        torch.cuda.set_sync_debug_mode("warn" if on else "default")

                trainer.fit(on_step=on_step)
            finally:
                warnings.showwarning = shown
                if device == "cuda":
                    torch.cuda.set_sync_debug_mode("default")
    finally:
        trainer.close()
    steps = last - first + 1
    problems = check_counts(counter.counts, steps)
    documented_files = {s.file for s in STEP_HOST_SYNCS}
    figures = {
        "device": device, "steps_observed": steps, "method": cfg.head.method, "sample_rate": cfg.head.sample_rate,
        "python_reads": {f"{f}:{fn}": n for (f, fn), n in sorted(counter.counts.items())},
        "python_read_problems": problems,
        "cuda_sync_debug": "torch.cuda.set_sync_debug_mode('warn')" if device == "cuda" else "not available on CPU",
        "cuda_syncs_per_step": {k: round(v / steps, 2) for k, v in sorted(cuda_sites.items())},
        "cuda_syncs_outside_documented_files": sorted(
            k for k in cuda_sites if k.split(":")[0] not in documented_files | {"partial_fc/head.py"}),
    }
    return {"status": "pass" if not problems else "fail", "figures": figures}


STEP_FUNCS: dict[str, Callable[[Path, bool], dict]] = {
    "tests": step_tests, "parity": step_parity, "head": step_head,
    "train_r50": lambda o, d: _step_train(o, d, "r50"), "train_r100": lambda o, d: _step_train(o, d, "r100"),
    "loader": step_loader, "syncs": step_syncs,
}


def run_step(name: str, out: Path, dry: bool) -> int:
    (out / "steps").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        res = STEP_FUNCS[name](out, dry)
    except BaseException as e:  # noqa: BLE001 - recorded in the summary, the other steps still run
        if isinstance(e, KeyboardInterrupt):
            raise
        res = {"status": "error", "figures": {}, "log_tail": traceback.format_exc()[-3000:]}
    res.update(name=name, seconds=round(time.perf_counter() - t0, 1), dry_run=dry)
    (out / "steps" / f"{name}.json").write_text(json.dumps(res, indent=1, default=str))
    print(f"[gpu_check] {name}: {res['status']} in {res['seconds']} s", flush=True)
    return 0


# ------------------------------------------------------------------------------------------------ summary
def _env() -> dict:
    info: dict[str, Any] = {"python": platform.python_version(), "host": platform.node(), "cpus": os.cpu_count()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpu_memory_gib"] = round(p.total_memory / 2**30, 1)
    except Exception as e:  # noqa: BLE001
        info["torch_error"] = str(e)
    import importlib.util

    for mod in ("nvidia.dali", "deepspeed", "onnxruntime"):
        try:
            info[mod] = importlib.util.find_spec(mod) is not None
        except (ImportError, ValueError):
            info[mod] = False
    return info


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if (abs(v) < 1e4 or not math.isfinite(v)) else f"{v:,.0f}"
    return str(v)


def summarise(out: Path, dry: bool, started: Optional[float]) -> int:
    steps = {}
    for name in STEPS:
        p = out / "steps" / f"{name}.json"
        rc_file = out / "steps" / f"{name}.rc"
        if p.is_file():
            steps[name] = json.loads(p.read_text())
        else:
            rc = rc_file.read_text().strip() if rc_file.is_file() else "not run"
            why = "timed out" if rc in ("124", "137") else f"no result (exit {rc})"
            steps[name] = {"name": name, "status": "error", "figures": {}, "log_tail": why}
    overall = "pass" if all(s["status"] in ("pass", "info") for s in steps.values()) else "fail"
    summary = {"overall": overall, "dry_run": dry, "environment": _env(), "goals": GOALS,
               "total_seconds": round(time.time() - started, 1) if started else None, "steps": steps}
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=1, default=str))
    md = [f"# GPU check{' (dry run: toy sizes on CPU; figures mean nothing)' if dry else ''}", "",
          f"Overall: **{overall}**" + (f" in {summary['total_seconds']} s" if started else ""), "",
          "Environment: " + ", ".join(f"{k} {v}" for k, v in summary["environment"].items()), "",
          "| step | status | seconds |", "|---|---|---:|"]
    md += [f"| {n} | {s['status']} | {s.get('seconds', '')} |" for n, s in steps.items()]
    t = steps["tests"]["figures"]
    md += ["", "## CUDA tests", "", f"`{t.get('command', '')}`: {t.get('passed', '?')} passed, "
           f"{len(t.get('failed', []))} failed, {t.get('skipped', '?')} skipped"
           + (f"; failed: {', '.join(t['failed'])}" if t.get("failed") else "")
           + (f"; modules not importable here: {', '.join(t['not_collected'])}" if t.get("not_collected") else "")]
    md += ["", "## Head parity (device vs fp64 CPU reference)", "",
           "| method | dtype | loss rel err | emb grad rel err | W grad rel err | criterion | pass |",
           "|---|---|---:|---:|---:|---|---|"]
    for r in steps["parity"]["figures"].get("rows", []):
        md.append(f"| {r['method']} | {r['dtype']} | {_fmt(r['loss_rel_err'])} | {_fmt(r['emb_grad_rel_err'])} | "
                  f"{_fmt(r.get('weight_grad_rel_err', ''))} | {r['criterion']} | {r['pass']} |")
    h = steps["head"]["figures"]
    md += ["", f"## Head step: {h.get('classes', '?'):,} classes, one emulated rank of {h.get('emulated_world', '?')} "
           f"({h.get('shard_classes', '?')} classes, global batch {h.get('global_batch', '?')}); {h.get('timing', '')}; "
           f"memory: {h.get('memory', '')}" if h else "## Head step", "",
           "| rate | design | step ms | peak MiB | time / ref (goal) | memory / ref (goal) | pass |",
           "|---:|---|---:|---:|---:|---:|---|"]
    for r in h.get("rows", []):
        md.append(f"| {r['rate']} | {r['design']} | {_fmt(r['step_ms'])} | {_fmt(r['peak_mib'])} | "
                  f"{r.get('time_ratio', '')} {('(' + r['time_goal'] + ')') if 'time_goal' in r else ''} | "
                  f"{r.get('mem_ratio', '')} {('(' + r['mem_goal'] + ')') if 'mem_goal' in r else ''} | "
                  f"{r.get('pass', '')} |")
    md += ["", "## Training throughput (bench_train, bf16, channels-last, synthetic batches)", "",
           "| backbone | images/s per device | goal | fraction of peak | status |", "|---|---:|---:|---:|---|"]
    for bb in ("r50", "r100"):
        s = steps[f"train_{bb}"]
        f = s["figures"]
        md.append(f"| {f.get('backbone', bb)} | {_fmt(f.get('images_per_s_per_device', ''))} | "
                  f">= {GOALS[bb + '_images_per_s']:,.0f} | {_fmt(f.get('fraction_of_peak'))} | {s['status']} |")
    lf = steps["loader"]["figures"]
    md += ["", "## Fallback loader", "", f"{lf.get('loader', '?')}: {_fmt(lf.get('images_per_s', '?'))} images/s "
           f"({_fmt(lf.get('images_per_cpu_s', '?'))} per CPU-second) on {lf.get('cpus', '?')} CPUs; DALI installed: "
           f"{lf.get('dali_installed', '?')}"]
    sf = steps["syncs"]["figures"]
    md += ["", "## Host syncs of ordinary steps", "",
           f"Python-level reads ({sf.get('steps_observed', '?')} steps, {sf.get('method', '?')}): "
           + (", ".join(f"`{k}` {v}" for k, v in sf.get("python_reads", {}).items()) or "none"),
           "", "Undocumented: " + ("; ".join(sf.get("python_read_problems", [])) or "none"), "",
           f"CUDA synchronising calls per step ({sf.get('cuda_sync_debug', '')}):", ""]
    md += [f"- `{k}`: {v}" for k, v in sf.get("cuda_syncs_per_step", {}).items()] or ["- none reported"]
    if sf.get("cuda_syncs_outside_documented_files"):
        md += ["", "Outside the documented files (review): " + ", ".join(sf["cuda_syncs_outside_documented_files"])]
    for n, s in steps.items():
        if s.get("log_tail"):
            md += ["", f"### {n}: {s['status']}", "", "```", s["log_tail"], "```"]
    (out / "gpu_check.md").write_text("\n".join(md) + "\n")
    print(f"[gpu_check] {overall}: {out / 'gpu_check.json'}, {out / 'gpu_check.md'}", flush=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("step", help="run one step")
    s.add_argument("name", choices=STEPS)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--dry-run", action="store_true")
    m = sub.add_parser("summary", help="write gpu_check.json and gpu_check.md from the steps' results")
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--dry-run", action="store_true")
    m.add_argument("--started", type=float, default=None, help="the script's start (unix seconds)")
    args = p.parse_args(argv)
    if args.cmd == "step":
        if args.dry_run:
            os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # the dry run never touches a GPU
        tempfile.tempdir = str(args.out / "tmp")
        (args.out / "tmp").mkdir(parents=True, exist_ok=True)
        return run_step(args.name, args.out, args.dry_run)
    return summarise(args.out, args.dry_run, args.started)


if __name__ == "__main__":
    raise SystemExit(main())

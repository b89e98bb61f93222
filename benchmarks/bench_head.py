"""Head-step benchmark: our head (ArcFace, s6) vs the reference Partial FC v2 design.

Times one head step (forward, backward, optimizer update of the head at fixed embeddings) and
measures the peak memory per rank. Memory: each design in its own fresh processes (see
``benchmarks/head_step.py`` for the reference design and the memory method). Time: all designs of
a configuration built side by side in one set of processes and stepped in turn (round robin,
median of ``--steps`` after ``--warmup``), so that a shared machine's changing load hits them
alike; wall and process-CPU seconds are both reported. Designs that would not fit side by side
(``--max-total-gib``) are timed one after the other instead, and the note says so. Example::

    python benchmarks/bench_head.py --classes 2059906 --world 8 --rates 0.3 --mode emulate

``--mode gloo`` spawns ``world`` real gloo ranks on this machine (all ranks share its cores and
memory). ``--mode emulate`` runs one process that stands for one rank of a ``world``-rank job
(the same shard size, global batch and sampled rows; collectives skipped), which measures per-rank
compute and memory for jobs whose ranks together would not fit this machine. Configurations whose
planned memory (``partial_fc.planner``) for all processes together exceeds ``--max-total-gib`` are
skipped and listed as such. Results: CSV rows and a Markdown table with the ratios to the
reference.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.head_step import design_method, interleaved_rank, spawn, spawn_fn  # noqa: E402
from partial_fc.planner import GIB, PlanConfig, plan_memory  # noqa: E402

DESIGNS = ("reference", "ours_arcface", "ours_s6")
BASELINE_GIB = 0.35  # torch + gloo resident per process on this machine (measured), for the skip rule


def _plan(design: str, classes: int, world: int, rate: float, batch: int, dim: int):
    method, con_rate = ("arcface", None) if design == "reference" else design_method(design)
    return plan_memory(PlanConfig(num_classes=classes, embedding_size=dim, world_size=world, sample_rate=rate,
                                  batch=batch, method=method, con_sample_rate=con_rate,
                                  row_update="dense" if design == "reference" else "lazy"))


def main(argv=None) -> int:
    """Runs the grid; writes ``--out`` (CSV) and ``--md`` (Markdown); returns 0."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", default="100000,1000000,2059906")
    p.add_argument("--world", default="1,2,4,8")
    p.add_argument("--rates", default="0.1,0.3")
    p.add_argument("--designs", default=",".join(DESIGNS),
                   help="comma-separated: reference, ours_arcface, ours_s6, or ours_s6_con<rate> (s6 with "
                        "head.con_sample_rate=<rate>, e.g. ours_s6_con0.05)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--mode", choices=["gloo", "emulate"], default="gloo")
    p.add_argument("--max-total-gib", type=float, default=14.0)
    p.add_argument("--mem-steps", type=int, default=1, help="timed steps of the fresh-process memory runs")
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per process (default: all cores, split across gloo ranks); 1 makes CPU "
                        "seconds a load-independent measure on a shared machine")
    p.add_argument("--out", default="benchmarks/results/bench_head.csv")
    p.add_argument("--md", default="benchmarks/results/bench_head.md")
    args = p.parse_args(argv)
    # Every allocation above 64 KiB gets its own mapping and goes back to the OS when freed, so the
    # peak RSS tracks the peak of live tensors (glibc would otherwise keep freed heap memory).
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    cpus = os.cpu_count() or 1
    rows = []
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fields = ["mode", "classes", "world", "rate", "design", "step_s", "cpu_s", "peak_mib", "planned_mib", "state_mib",
              "mem_run_step_s", "note"]
    with open(args.out, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for classes in map(int, args.classes.split(",")):
            for world in map(int, args.world.split(",")):
                for rate in map(float, args.rates.split(",")):
                    procs = world if args.mode == "gloo" else 1
                    threads = args.threads or (max(1, cpus // world) if args.mode == "gloo" else cpus)
                    emul = {} if args.mode == "gloo" else {"emulate_world": world}
                    config_rows, ran = [], []
                    for design in args.designs.split(","):
                        plan = _plan(design, classes, world, rate, args.batch, args.dim)
                        need = procs * (plan.head_total / GIB + BASELINE_GIB)
                        row = dict(mode=args.mode, classes=classes, world=world, rate=rate, design=design,
                                   planned_mib=round(plan.head_total / 2**20, 1), note="")
                        if need > args.max_total_gib:
                            row.update(note=f"skipped: planned {need:.1f} GiB > {args.max_total_gib} GiB")
                        else:
                            kw = dict(design=design, num_classes=classes, dim=args.dim, rate=rate, batch=args.batch,
                                      steps=args.mem_steps, warmup=1, **emul)
                            try:  # memory: a fresh set of processes per design
                                res = spawn(procs, "/tmp/pfc_bench", threads, args.timeout, **kw)
                                row.update(peak_mib=round(max(r["peak_bytes"] for r in res) / 2**20, 1),
                                           state_mib=round(max(r["state_bytes"] for r in res) / 2**20, 1),
                                           mem_run_step_s=round(max(r["step_s"] for r in res), 3))
                                ran.append(design)
                            except RuntimeError as e:
                                row.update(note=f"failed: {str(e).splitlines()[0]}")
                        config_rows.append(row)
                    # Time: all designs that fit, one step each in turn, in the same processes; when
                    # they do not fit side by side, each design alone (and the note says so).
                    together = procs * sum(_plan(d, classes, world, rate, args.batch, args.dim).head_total / GIB
                                           + BASELINE_GIB for d in ran)
                    groups = [ran] if together <= args.max_total_gib else [[d] for d in ran]
                    for group in groups if ran else []:
                        kw = dict(designs=group, num_classes=classes, dim=args.dim, rate=rate, batch=args.batch,
                                  steps=args.steps, warmup=args.warmup, **emul)
                        try:
                            res = spawn_fn(interleaved_rank, procs, "/tmp/pfc_bench", threads, args.timeout, **kw)
                            for row in config_rows:
                                if row["design"] in group:
                                    row["step_s"] = round(max(r[row["design"]]["wall_s"] for r in res), 3)
                                    row["cpu_s"] = round(max(r[row["design"]]["cpu_s"] for r in res), 3)
                                    if len(groups) > 1:
                                        row["note"] += f"timed alone (together {together:.1f} GiB)"
                        except RuntimeError as e:
                            for row in config_rows:
                                if row["design"] in group:
                                    row["note"] += f" timing failed: {str(e).splitlines()[0]}"
                    for row in config_rows:
                        print(row, flush=True)
                        w.writerow(row)
                        rows.append(row)
                    fh.flush()
    _markdown(rows, args.md)
    return 0


def _markdown(rows: list[dict], path: str) -> None:
    by = {(r["mode"], r["classes"], r["world"], r["rate"], r["design"]): r for r in rows}
    out = ["| mode | classes | world | rate | design | step s (wall) | step CPU s | peak MiB/rank | planned MiB | "
           "time / ref | CPU / ref | mem / ref | note |",
           "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        ref = by.get((r["mode"], r["classes"], r["world"], r["rate"], "reference"), {})
        tr = cr = mr = ""
        if r["design"] != "reference" and ref.get("step_s") and r.get("step_s"):
            tr = f"{r['step_s'] / ref['step_s']:.2f}"
            cr = f"{r['cpu_s'] / ref['cpu_s']:.2f}"
        if r["design"] != "reference" and ref.get("peak_mib") and r.get("peak_mib"):
            mr = f"{r['peak_mib'] / ref['peak_mib']:.2f}"
        out.append(f"| {r['mode']} | {r['classes']:,} | {r['world']} | {r['rate']} | {r['design']} | "
                   f"{r.get('step_s', '')} | {r.get('cpu_s', '')} | {r.get('peak_mib', '')} | {r['planned_mib']} | "
                   f"{tr} | {cr} | {mr} | {r.get('note', '')} |")
    Path(path).write_text("\n".join(out) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())

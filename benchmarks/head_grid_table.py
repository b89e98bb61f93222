"""Compact Markdown table of one or more ``bench_head.py`` CSVs: one row per configuration.

Columns: CPU seconds per head step of the reference, of our ArcFace head (and its ratio to the
reference), of s6 and s6 with its own Con sample (ratios to our ArcFace); peak MiB per rank of the
reference and ours (ratio), and of s6. CPU seconds, not wall: on a shared machine with one torch
thread per process they do not depend on the other jobs' load. Example::

    python benchmarks/head_grid_table.py benchmarks/results/grid_emulate_*.csv > table.md
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from collections import defaultdict


def _f(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def table(paths: list[str]) -> str:
    """The Markdown table of the CSV files ``paths`` (later files win on repeated configurations)."""
    cells: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for path in paths:
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                key = (row["mode"], int(row["classes"]), int(row["world"]), float(row["rate"]))
                cells[key][row["design"]] = row
    con = sorted({d for c in cells.values() for d in c if d.startswith("ours_s6_con")})
    head = ["classes", "world", "rate", "ref CPU s", "ours CPU s", "ours / ref", "s6 / ours"]
    head += [f"{d.removeprefix('ours_')} / ours" for d in con]
    head += ["ref MiB", "ours MiB", "ours / ref", "s6 MiB", "note"]
    out = ["| " + " | ".join(head) + " |", "|" + "---:|" * (len(head) - 1) + "---|"]
    for key in sorted(cells):
        c = cells[key]
        get = lambda d, f: _f(c.get(d, {}).get(f))  # noqa: E731
        ref_t, ours_t, s6_t = get("reference", "cpu_s"), get("ours_arcface", "cpu_s"), get("ours_s6", "cpu_s")
        ref_m, ours_m, s6_m = get("reference", "peak_mib"), get("ours_arcface", "peak_mib"), get("ours_s6", "peak_mib")
        ratio = lambda a, b: f"{a / b:.2f}" if a and b else ""  # noqa: E731
        num = lambda x, fmt: format(x, fmt) if x is not None else ""  # noqa: E731
        # "timed alone (together X GiB)" differs per run; the fact, not the figure, belongs here.
        notes = sorted({re.sub(r" \(together [^)]*\)", "", r.get("note", "")).strip() for r in c.values()} - {""})
        cols = [f"{key[1]:,}", str(key[2]), str(key[3]), num(ref_t, ".2f"), num(ours_t, ".2f"), ratio(ours_t, ref_t),
                ratio(s6_t, ours_t)]
        cols += [ratio(get(d, "cpu_s"), ours_t) for d in con]
        cols += [num(ref_m, ",.0f"), num(ours_m, ",.0f"), ratio(ours_m, ref_m), num(s6_m, ",.0f"), "; ".join(notes)]
        out.append("| " + " | ".join(cols) + " |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    """Prints the table of the CSVs given on the command line; returns 0."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv", nargs="+")
    sys.stdout.write(table(p.parse_args(argv).csv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Data path at WebFace42M scale: open, cache build, 8 ranks at once, epoch order, pack throughput.

Builds a synthetic plain-layout RecordIO file of WebFace42M's shape (42,474,557 image
records over 2,059,906 classes; 4-byte payloads: nothing is decoded) and measures, each in
a fresh process:

* ``build``: first open of ``FaceRecordDataset`` (parses the ``.idx``, reads every record
  header, writes the binary index cache);
* ``warm``: a later open (memory-maps the cache);
* ``ranks``: ``--ranks`` processes opening at once, each computing its epoch order and
  gathering its labels (what a rank does before its first step): wall time and memory per
  rank from ``/proc/<pid>/smaps_rollup`` (USS = Private_Clean + Private_Dirty, PSS, and
  Anonymous = memory the rank materialised itself; file pages of the memory-mapped
  cache are shared through the page cache, but count as private in USS while only one
  process has touched them, and as dirty until written back);
* ``order``: the first epoch order of rank 0 (time, private memory);
* ``pack`` (``--pack-images N``): ``pack_folder`` on a generated tree of N 112x112 JPEGs
  (copied byte for byte), with one worker, in images/s per core.

Run (data go to ``--dir``, never into the repository)::

    nice -n 5 python benchmarks/bench_data_scale.py --dir /tmp/pfc-scale \\
        --json benchmarks/results/data_scale.json --pack-images 200000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RECORDS = 42_474_557
CLASSES = 2_059_906
MAGIC = 0xCED7230A


def write_synthetic_plain(rec: Path, records: int, classes: int, chunk: int = 1 << 22) -> None:
    """Writes a plain-layout ``.rec``/``.idx`` of ``records`` tiny image records, vectorised.

    Record ``i`` has label ``i * classes // records`` (classes of ~equal size, in order),
    ``id = i`` and a 4-byte payload, framed as a single RecordIO part (36 bytes).
    """
    from dali_pipelines.recordio import format_index_lines

    dt = np.dtype([("magic", "<u4"), ("lrec", "<u4"), ("flag", "<u4"), ("label", "<f4"),
                   ("id", "<u8"), ("id2", "<u8"), ("payload", "<u4")])
    assert dt.itemsize == 36
    tmp_rec, tmp_idx = Path(str(rec) + ".tmp"), Path(str(rec.with_suffix(".idx")) + ".tmp")
    with open(tmp_rec, "wb") as fr, open(tmp_idx, "wb") as fi:
        for lo in range(0, records, chunk):
            i = np.arange(lo, min(records, lo + chunk), dtype=np.int64)
            a = np.zeros(len(i), dtype=dt)
            a["magic"] = MAGIC
            a["lrec"] = 24 + 4
            a["label"] = (i * classes // records).astype(np.float32)
            a["id"] = i
            a["payload"] = (i & 0xFFFF).astype(np.uint32)  # never the magic word
            fr.write(a.tobytes())
            fi.write(format_index_lines(i, i * 36))
    os.replace(tmp_idx, rec.with_suffix(".idx"))
    os.replace(tmp_rec, rec)


def smaps() -> dict[str, int]:
    """``/proc/self/smaps_rollup`` fields in bytes (Rss, Pss, Private_*, Shared_*)."""
    out = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[-1] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    out["USS"] = out.get("Private_Clean", 0) + out.get("Private_Dirty", 0)
    return out


def _measure(mode: str, rec: str, rank: int, world: int, batch: int, start_at: float) -> dict:
    """One measurement in this (fresh) process; returns a JSON-able dict."""
    t_imp = time.perf_counter()
    from dali_pipelines import FaceRecordDataset
    from dali_pipelines.sampling import epoch_order

    t_imp = time.perf_counter() - t_imp

    if start_at:
        time.sleep(max(0.0, start_at - time.time()))  # ranks start together
    base = smaps()
    t0 = time.perf_counter()
    ds = FaceRecordDataset(rec)
    t_open = time.perf_counter() - t0
    after_open = smaps()
    res = {"mode": mode, "rank": rank, "world": world, "import_s": t_imp, "open_s": t_open, "images": len(ds),
           "classes": ds.num_classes, "memmap": isinstance(ds.labels, np.memmap)}
    if mode in ("ranks", "order"):
        t1 = time.perf_counter()
        idx, flips = epoch_order(len(ds), batch_size=batch, rank=rank, world_size=world, seed=1, epoch=0)
        res["order_s"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        labels = np.asarray(ds.labels[idx[: 1 << 20]])  # the first ~8k batches' labels, as the loader reads them
        res["gather_s"] = time.perf_counter() - t2
        res["order_len"] = int(len(idx))
        del labels
    end = smaps()
    res["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for k in ("USS", "Pss", "Private_Dirty", "Anonymous", "Rss"):
        res[f"{k}_base"] = base.get(k, 0)
        res[f"{k}_open"] = after_open.get(k, 0)
        res[f"{k}_end"] = end.get(k, 0)
    res["total_s"] = time.perf_counter() - t0
    return res


def _spawn(mode: str, rec: Path, rank: int = 0, world: int = 1, batch: int = 128,
           start_at: float = 0.0) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "_measure", mode, str(rec), str(rank), str(world), str(batch), str(start_at)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)


def _result(p: subprocess.Popen, timeout: float = 1800) -> dict:
    out, _ = p.communicate(timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"measurement failed with exit {p.returncode}")
    return json.loads(out.strip().splitlines()[-1])


def bench_pack(dir_: Path, n: int, per_id: int = 20) -> dict:
    """Packs a generated tree of ``n`` 112x112 JPEGs with one worker; images/s per core."""
    import io

    from PIL import Image

    from dali_pipelines.pack import pack_folder

    def make_jpeg(seed: int) -> bytes:  # a smooth random 112x112 face-sized JPEG (~2-4 KB)
        small = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(small).resize((112, 112), Image.BILINEAR).save(buf, format="JPEG", quality=90)
        return buf.getvalue()

    tree = dir_ / f"tree-{n}"
    if not (tree / ".complete").exists():
        shutil.rmtree(tree, ignore_errors=True)
        jpegs = [make_jpeg(s) for s in range(64)]
        for c in range(-(-n // per_id)):
            d = tree / f"id{c:07d}"
            d.mkdir(parents=True)
            for k in range(min(per_id, n - c * per_id)):
                (d / f"{k:03d}.jpg").write_bytes(jpegs[(c * 7 + k) % 64])
        (tree / ".complete").write_text("")
    out = dir_ / "packed"
    shutil.rmtree(out, ignore_errors=True)
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    s = pack_folder(tree, out / "faces.rec", workers=1, progress=False)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    s2 = pack_folder(tree, out / "faces", workers=2, shards=4, progress=False)
    wall2 = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    return {"images": s.images, "wall_s_1_worker": wall, "cpu_s_1_worker": cpu,
            "images_per_s_1_worker": s.images / wall, "images_per_cpu_s": s.images / cpu,
            "sharded_4_workers_2_wall_s": wall2, "sharded_images_per_s": s2.images / wall2}


def _bench_open(args: argparse.Namespace, results: dict) -> None:
    """Generates the data if needed and runs the open / ranks / order measurements."""
    rec = args.dir / f"plain-{args.records}.rec"
    if not rec.exists():
        t0 = time.perf_counter()
        write_synthetic_plain(rec, args.records, args.classes)
        results["generate_s"] = time.perf_counter() - t0
    results["rec_bytes"] = rec.stat().st_size
    results["idx_bytes"] = rec.with_suffix(".idx").stat().st_size
    shutil.rmtree(args.dir / ".pfc-index", ignore_errors=True)
    results["build"] = _result(_spawn("build", rec))
    results["warm"] = _result(_spawn("warm", rec))
    results["order"] = _result(_spawn("order", rec, 0, args.ranks, args.batch))
    t0 = time.perf_counter()
    start = time.time() + 2.0
    procs = [_spawn("ranks", rec, r, args.ranks, args.batch, start) for r in range(args.ranks)]
    ranks = [_result(q) for q in procs]
    results["ranks_wall_s"] = time.perf_counter() - t0 - 2.0
    results["ranks"] = ranks
    g = 2**30
    b, w = results["build"], results["warm"]
    print(f"{args.records} records / {args.classes} classes: .rec {results['rec_bytes'] / g:.2f} GiB, "
          f".idx {results['idx_bytes'] / g:.2f} GiB")
    print(f"first open (cache build): {b['open_s']:.1f} s, peak RSS {b['peak_rss'] / g:.2f} GiB")
    print(f"warm open: {w['open_s']:.2f} s, USS after open {(w['USS_open'] - w['USS_base']) / 2**20:.0f} MiB "
          "above the interpreter")
    o = results["order"]
    print(f"epoch order rank 0 of {args.ranks}: {o['order_s']:.2f} s, {o['order_len']} samples, anonymous "
          f"+{(o['Anonymous_end'] - o['Anonymous_open']) / 2**20:.0f} MiB")
    print(f"{args.ranks} ranks at once: wall {results['ranks_wall_s']:.1f} s")
    for r in ranks:
        print(f"  rank {r['rank']}: import {r['import_s']:.1f} s, open {r['open_s']:.2f} s, order {r['order_s']:.2f} s, USS {r['USS_end'] / g:.3f} "
              f"GiB (interpreter {r['USS_base'] / g:.3f}), PSS {r['Pss_end'] / g:.3f} GiB, private dirty "
              f"{r['Private_Dirty_end'] / g:.3f} GiB, anonymous {r['Anonymous_end'] / g:.3f} GiB")


def main(argv: list[str] | None = None) -> int:
    """Generates the data if needed, runs every measurement, prints and writes JSON."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_measure":
        mode, rec, rank, world, batch, start_at = argv[1:7]
        print(json.dumps(_measure(mode, rec, int(rank), int(world), int(batch), float(start_at))))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, default=Path("/tmp/pfc-scale"))
    p.add_argument("--records", type=int, default=RECORDS)
    p.add_argument("--classes", type=int, default=CLASSES)
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--pack-images", type=int, default=0, help="also measure pack on a tree of N JPEGs")
    p.add_argument("--pack-only", action="store_true", help="only the pack measurement")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    results: dict = {"records": args.records, "classes": args.classes, "ranks": args.ranks,
                     "machine": f"{os.cpu_count()} CPUs", "python": sys.version.split()[0]}
    if not args.pack_only:
        _bench_open(args, results)
    if args.pack_images:
        results["pack"] = bench_pack(args.dir, args.pack_images)
        pk = results["pack"]
        print(f"pack {pk['images']} JPEGs, 1 worker: {pk['images_per_s_1_worker']:.0f} images/s wall, "
              f"{pk['images_per_cpu_s']:.0f} images per CPU-second; 4 shards x 2 workers: "
              f"{pk['sharded_images_per_s']:.0f} images/s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

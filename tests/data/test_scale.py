"""Data at WebFace42M scale: sharded and plain packs, resume, index cache, bounded epoch order."""

from __future__ import annotations

import importlib.util
import json
import multiprocessing as mp
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dali_pipelines import FaceRecordDataset, RecordIOError, build_train_loader
from dali_pipelines import pack as pack_mod
from dali_pipelines.cli import main as data_main
from dali_pipelines.pack import PackError, pack_folder, verify_dataset
from dali_pipelines.recordio import RecordWriter, read_index

from .conftest import make_jpeg

REPO = Path(__file__).resolve().parents[2]


def _tree(root: Path, ids: int = 12, bomb: str | None = None) -> Path:
    """``ids`` identity folders with 2..5 small JPEGs each (some 64x64: re-encoded)."""
    for c in range(ids):
        d = root / f"id{c:03d}"
        d.mkdir(parents=True)
        for k in range(2 + c % 4):
            (d / f"{k}.jpg").write_bytes(make_jpeg(c * 10 + k, size=112 if k else 64))
    if bomb is not None:
        Image.new("L", (300, 300)).save(root / bomb)
    return root


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


# ----------------------------------------------------------------------------- layouts


def test_sharded_round_trip_and_same_batches_as_one_file(tmp_path: Path) -> None:
    root = _tree(tmp_path / "faces")
    s = pack_folder(root, tmp_path / "sh" / "train", shards=3, workers=2, progress=False)
    assert (s.shards, s.identities, s.layout) == (3, 12, "plain")
    one = pack_folder(root, tmp_path / "one.rec", workers=1, progress=False)
    plain = pack_folder(root, tmp_path / "plain.rec", workers=1, progress=False, layout="plain")
    assert one.layout == "insightface" and plain.layout == "plain"
    m = json.loads((tmp_path / "sh" / "train.json").read_text())
    assert m["format"] == "partial-fc-shards" and m["num_images"] == s.images == one.images
    assert m["num_classes"] == 12 and [sh["rec"] for sh in m["shards"]] == [
        f"train-{i:05d}-of-00003.rec" for i in range(3)]
    ranges = [sh["label_range"] for sh in m["shards"]]
    assert ranges[0][0] == 0 and ranges[-1][1] == 11
    assert all(a[1] + 1 == b[0] for a, b in zip(ranges, ranges[1:]))  # identities never split
    sharded = FaceRecordDataset(tmp_path / "sh" / "train.json")
    listed = FaceRecordDataset([str(tmp_path / "sh" / sh["rec"]) for sh in m["shards"]])
    single = FaceRecordDataset(tmp_path / "one.rec")
    flat = FaceRecordDataset(tmp_path / "plain.rec")
    assert sharded.num_shards == 3 and sharded.num_classes == single.num_classes == flat.num_classes == 12
    for ds in (listed, single, flat):
        assert np.array_equal(ds.labels, sharded.labels)
        assert np.array_equal(ds.class_counts, sharded.class_counts)
        assert all(bytes(ds.encoded_image(i)) == bytes(sharded.encoded_image(i)) for i in range(len(ds)))
    # The shard boundary sits inside the label space: shard 1 alone keeps its global labels.
    shard1 = FaceRecordDataset(tmp_path / "sh" / m["shards"][1]["rec"])
    assert shard1.labels.min() == ranges[1][0] and shard1.labels.max() == ranges[1][1]
    b = m["shards"][0]["images"]
    assert sharded.labels[b - 1] == ranges[0][1] and sharded.labels[b] == ranges[1][0]
    assert "shard 1" in sharded.where(b)
    # Same seed, same batches from the shards and from the single file.
    kw = dict(batch_size=4, world_size=2, seed=3, num_workers=0)
    for rank in range(2):
        xa, ya = zip(*build_train_loader("torch", tmp_path / "sh" / "train.json", rank=rank, **kw))
        xb, yb = zip(*build_train_loader("torch", tmp_path / "one.rec", rank=rank, **kw))
        assert torch.equal(torch.cat(ya), torch.cat(yb)) and torch.equal(torch.cat(xa), torch.cat(xb))
    assert verify_dataset(tmp_path / "sh" / "train.json").ok


def test_dali_reads_shards(tmp_path: Path) -> None:
    pytest.importorskip("nvidia.dali")
    from dali_pipelines.dali import mxnet_reader_pipeline

    root = _tree(tmp_path / "faces", ids=6)
    pack_folder(root, tmp_path / "sh" / "t", shards=2, workers=1, progress=False)
    pack_folder(root, tmp_path / "one.rec", workers=1, progress=False)
    kw = dict(batch_size=4, world_size=1, seed=1, num_workers=1)
    ya = torch.cat([y for _, y in build_train_loader("dali", tmp_path / "sh" / "t.json", **kw)])
    yb = torch.cat([y for _, y in build_train_loader("dali", tmp_path / "one.rec", **kw)])
    assert torch.equal(ya, yb)
    ds = FaceRecordDataset(tmp_path / "sh" / "t.json")
    recs, idx = ds.dali_reader_inputs()
    assert len(recs) == 2
    pipe = mxnet_reader_pipeline(recs, idx, batch_size=len(ds), decode=False)
    jpegs, labels = pipe.run()
    got = [int(np.asarray(labels.at(i)).reshape(-1)[0]) for i in range(len(ds))]
    assert got == ds.labels.tolist()  # file order, across the shard boundary
    assert all(bytes(np.asarray(jpegs.at(i))) == bytes(ds.encoded_image(i)) for i in range(len(ds)))


# ----------------------------------------------------------------------------- failure and resume


def test_decompression_bomb_names_file_and_leaves_nothing_final(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    root = _tree(tmp_path / "faces", ids=4, bomb="id002/zz_bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)  # 300x300 > 2x the limit: a "bomb"
    for workers in (1, 2):
        out = tmp_path / f"o{workers}" / "train.rec"
        with pytest.raises(PackError, match=r"id002/zz_bomb\.png.*decompression bomb"):
            pack_folder(root, out, workers=workers, progress=False)
        assert not out.exists() and not out.with_suffix(".idx").exists()
        assert not list(out.parent.glob("*.partial"))
    # CLI: a clean message and exit 2, nothing final on disk.
    out = tmp_path / "cli" / "t.rec"
    assert data_main(["pack", str(root), str(out), "--workers", "1", "--no-progress"]) == 2
    assert not out.exists()
    # Sharded: the shards without the bomb finish and are kept; removing the file and running
    # the same command again redoes only the shard that held it.
    sh = tmp_path / "sh" / "t"
    with pytest.raises(PackError, match="zz_bomb"):
        pack_folder(root, sh, shards=4, workers=2, progress=False)
    assert not sh.with_suffix(".json").exists() and not (tmp_path / "sh" / "t-00002-of-00004.rec").exists()
    (root / "id002" / "zz_bomb.png").unlink()
    s = pack_folder(root, sh, shards=4, workers=1, progress=False)
    assert s.resumed_shards == 3 and len(FaceRecordDataset(sh.with_suffix(".json"))) == 14


def test_ctrl_c_leaves_no_valid_looking_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _tree(tmp_path / "faces", ids=4)
    real = pack_mod.prepare_image
    calls = {"n": 0}

    def interrupt_on_5th(*a, **k):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(pack_mod, "prepare_image", interrupt_on_5th)
    out = tmp_path / "o" / "train.rec"
    with pytest.raises(KeyboardInterrupt):
        pack_folder(root, out, workers=1, progress=False)
    assert not out.exists() and not out.with_suffix(".idx").exists()
    with pytest.raises((FileNotFoundError, RecordIOError)):
        FaceRecordDataset(out)
    monkeypatch.setattr(pack_mod, "prepare_image", real)
    s = pack_folder(root, out, workers=1, progress=False)  # the same command finishes the job
    assert len(FaceRecordDataset(out)) == s.images == 14


_KILLER = textwrap.dedent("""
    import os, signal, sys
    from dali_pipelines import pack
    real = pack._prepare_file
    def die_in_shard_1(args):
        if "id005" in args[0] and args[0].endswith("1.jpg"):
            os.killpg(os.getpgid(0), signal.SIGKILL)  # the whole pack dies mid-shard, no cleanup
        return real(args)
    pack._prepare_file = die_in_shard_1
    pack.pack_folder(sys.argv[1], sys.argv[2], shards=3, workers=int(sys.argv[3]), progress=False)
""")


@pytest.mark.parametrize("workers", [1, 3])
def test_resume_after_kill_is_byte_identical(tmp_path: Path, workers: int) -> None:
    root = _tree(tmp_path / "faces", ids=12)
    ref = tmp_path / "ref"
    pack_folder(root, ref / "train", shards=3, workers=1, progress=False)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", _KILLER, str(root), str(out / "train"), str(workers)],
                          env=env, timeout=120, start_new_session=True, capture_output=True)
    assert proc.returncode == -9
    assert not (out / "train.json").exists()  # no manifest: the dataset does not look complete
    assert not (out / "train-00001-of-00003.rec").exists()  # the killed shard never got its final name
    with pytest.raises(RecordIOError):
        FaceRecordDataset(out / "train.json")
    s = pack_folder(root, out / "train", shards=3, workers=2, progress=False)
    assert s.resumed_shards >= (1 if workers == 1 else 0)
    assert not list(out.glob("*.partial"))
    assert _files(out) == _files(ref)  # shards, indexes and manifest byte for byte
    again = pack_folder(root, out / "train", shards=3, workers=1, progress=False)
    assert again.resumed_shards == 3 and _files(out) == _files(ref)
    # Resuming with other options is refused instead of mixing two packs.
    with pytest.raises(ValueError, match="different input folder or options"):
        pack_folder(root, out / "train", shards=3, workers=1, progress=False, quality=80)


def test_insightface_above_2_24_refused_up_front(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _tree(tmp_path / "faces", ids=4)  # 14 images + 4 identities + header = 19 records
    monkeypatch.setattr(pack_mod, "INSIGHTFACE_MAX_RECORDS", 18)
    called = []
    monkeypatch.setattr(pack_mod, "_prepare_file", lambda a: called.append(a))
    with pytest.raises(ValueError, match=r"need 19 records, more than the insightface layout holds.*plain"):
        pack_folder(root, tmp_path / "x.rec", layout="insightface", progress=False)
    assert not called and not list(tmp_path.glob("x*"))  # before any work, nothing written
    with pytest.raises(ValueError, match="single file"):
        pack_folder(root, tmp_path / "x", layout="insightface", shards=2, progress=False)
    monkeypatch.undo()
    monkeypatch.setattr(pack_mod, "INSIGHTFACE_MAX_RECORDS", 18)
    s = pack_folder(root, tmp_path / "auto.rec", workers=1, progress=False)  # auto falls back to plain
    assert s.layout == "plain" and FaceRecordDataset(tmp_path / "auto.rec").layout == "plain"


def test_corrupt_shard_names_shard_and_offset(tmp_path: Path) -> None:
    root = _tree(tmp_path / "faces", ids=9)
    pack_folder(root, tmp_path / "sh" / "t", shards=3, workers=1, progress=False)
    FaceRecordDataset(tmp_path / "sh" / "t.json")  # cache built
    assert data_main(["pack", "--verify", str(tmp_path / "sh" / "t.json")]) == 0
    bad = tmp_path / "sh" / "t-00001-of-00003.rec"
    _, offs = read_index(bad.with_suffix(".idx"))
    data = bytearray(bad.read_bytes())
    data[offs[2] : offs[2] + 4] = b"JUNK"
    bad.write_bytes(bytes(data))
    with pytest.raises(RecordIOError, match=rf"t-00001-of-00003\.rec: bad magic .* at offset {offs[2]}"):
        FaceRecordDataset(tmp_path / "sh" / "t.json")  # the changed file is not served from the cache
    rep = verify_dataset(tmp_path / "sh" / "t.json")
    assert not rep.ok and f"shard 1 ({bad})" in rep.problems[0] and f"offset {offs[2]}" in rep.problems[0]
    assert data_main(["pack", "--verify", str(tmp_path / "sh" / "t.json")]) == 1
    # Trailing garbage after the last record is a problem too.
    good = tmp_path / "sh" / "t-00002-of-00003.rec"
    with open(good, "ab") as f:
        f.write(b"\0" * 8)
    assert any("the last record ends" in p for p in verify_dataset(good).problems)


# ----------------------------------------------------------------------------- index


def test_idx_binary_garbage_names_file_and_line(tmp_path: Path) -> None:
    rec = tmp_path / "g.rec"
    with RecordWriter(rec, rec.with_suffix(".idx")) as w:
        for k in range(3):
            w.write_image(k, float(k), make_jpeg(k))
    idx = rec.with_suffix(".idx")
    lines = idx.read_bytes().splitlines(keepends=True)
    idx.write_bytes(lines[0] + b"\x89PNG\r\n\x1a\n\xff\xfe\x00garbage\n" + lines[1] + lines[2])
    with pytest.raises(RecordIOError, match=r"g\.idx:2: binary or non-numeric data"):
        FaceRecordDataset(rec)


def _write_plain(rec: Path, labels: list[int]) -> None:
    with RecordWriter(rec, rec.with_suffix(".idx")) as w:
        for k, lab in enumerate(labels):
            w.write_image(k, float(lab), make_jpeg(k))


def test_cache_reused_rebuilt_on_change_never_stale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dali_pipelines import dataset as dataset_mod

    rec = tmp_path / "c.rec"
    _write_plain(rec, [0, 1, 2, 1])
    ds = FaceRecordDataset(rec)
    assert ds.cache_path is not None and ds.cache_path.parent == tmp_path / ".pfc-index"
    assert isinstance(ds.labels, np.memmap) and ds.labels.tolist() == [0, 1, 2, 1]

    def boom(*a, **k):  # type: ignore[no-untyped-def]
        raise AssertionError("rebuilt although the data did not change")

    monkeypatch.setattr(dataset_mod, "build_index", boom)
    assert FaceRecordDataset(rec).labels.tolist() == [0, 1, 2, 1]  # served from the cache
    monkeypatch.undo()
    # Same size, new labels: rewritten in place within the same timestamp tick is still seen.
    _write_plain(rec, [3, 1, 2, 0])
    assert FaceRecordDataset(rec).labels.tolist() == [3, 1, 2, 0]
    assert len(list((tmp_path / ".pfc-index").glob("c.rec-*"))) == 1  # the stale entry was removed
    # A different .idx (fewer records) changes the key too.
    idx = rec.with_suffix(".idx")
    idx.write_text("".join(idx.read_text().splitlines(keepends=True)[:2]))
    assert FaceRecordDataset(rec).labels.tolist() == [3, 1]
    assert len(list((tmp_path / ".pfc-index").glob(".c.rec-*.lock"))) == 1  # old lock files go too
    # An explicit cache_dir; a data directory where no cache can be written falls back to
    # $PFC_INDEX_CACHE.
    ds2 = FaceRecordDataset(rec, cache_dir=tmp_path / "elsewhere")
    assert ds2.cache_path is not None and ds2.cache_path.parent == tmp_path / "elsewhere"
    ro = tmp_path / "ro"
    ro.mkdir()
    _write_plain(ro / "r.rec", [1, 0])
    (ro / ".pfc-index").write_text("not a directory")  # mkdir fails here, as on a read-only mount
    monkeypatch.setenv("PFC_INDEX_CACHE", str(tmp_path / "home"))
    ds3 = FaceRecordDataset(ro / "r.rec")
    assert ds3.cache_path is not None and ds3.cache_path.parent == tmp_path / "home"
    assert ds3.labels.tolist() == [1, 0]


def _open_in_child(args: tuple[str, float]) -> list[int]:
    import time

    rec, start = args
    time.sleep(max(0.0, start - time.time()))
    return FaceRecordDataset(rec).labels.tolist()


def test_two_processes_building_at_once_leave_one_valid_cache(tmp_path: Path) -> None:
    import time

    rec = tmp_path / "race.rec"
    labels = [i % 7 for i in range(300)]
    _write_plain(rec, labels)
    start = time.time() + 1.0
    with mp.get_context("spawn").Pool(2) as pool:
        got = pool.map_async(_open_in_child, [(str(rec), start)] * 2).get(timeout=60)
    assert got == [labels, labels]
    entries = [p for p in (tmp_path / ".pfc-index").iterdir() if p.is_dir()]
    assert len(entries) == 1 and not any(".tmp-" in p.name for p in entries)
    assert FaceRecordDataset(rec).labels.tolist() == labels


def test_pickled_dataset_remaps_the_cache(tmp_path: Path) -> None:
    import pickle

    rec = tmp_path / "p.rec"
    _write_plain(rec, [0, 1, 1])
    ds = FaceRecordDataset(rec)
    blob = pickle.dumps(ds)
    assert len(blob) < 4096  # arrays are not shipped, the worker maps the cache
    ds2 = pickle.loads(blob)
    assert ds2.labels.tolist() == [0, 1, 1] and bytes(ds2.encoded_image(2)) == make_jpeg(2)


# ----------------------------------------------------------------------------- memory bounded by the share


_CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    from dali_pipelines import FaceRecordDataset
    from dali_pipelines.sampling import epoch_order
    def dirty():  # anonymous memory: what this process materialised (mapped files do not count)
        with open("/proc/self/smaps_rollup") as f:
            return sum(int(l.split()[1]) * 1024 for l in f if l.startswith(("Anonymous:", "Swap:")))
    rec, world = sys.argv[1], int(sys.argv[2])
    base = dirty()
    ds = FaceRecordDataset(rec)
    opened = dirty()
    idx, flips = epoch_order(len(ds), batch_size=64, rank=world - 1, world_size=world, seed=1, epoch=0)
    labels = np.asarray(ds.labels[idx])
    print(json.dumps({"open": opened - base, "share": dirty() - base, "n": len(ds), "m": len(idx),
                      "memmap": isinstance(ds.labels, np.memmap)}))
""")


def test_open_memory_grows_with_the_rank_share_not_the_dataset(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("bench_data_scale", REPO / "benchmarks" / "bench_data_scale.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    n = 2_000_000
    rec = tmp_path / "big.rec"
    bench.write_synthetic_plain(rec, n, 100_000)
    FaceRecordDataset(rec)  # first open builds the cache (vectorised, a few seconds)
    # Freed temporaries go back to the OS at once, so "dirty" counts live arrays only.
    env = dict(os.environ, PYTHONPATH=str(REPO), MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    res = {}
    for world in (1, 8):
        out = subprocess.run([sys.executable, "-c", _CHILD, str(rec), str(world)], env=env, timeout=120,
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        res[world] = json.loads(out.stdout.strip().splitlines()[-1])
    mib = 2**20
    # Materialised per-image arrays would cost >= 40 bytes x 2M = 80 MB per process.
    assert res[8]["memmap"] and res[8]["n"] == n
    assert res[8]["open"] < 8 * mib, res
    # Rank memory follows its share: 1/8 of the samples costs well under half of all of them.
    per_sample_8 = res[8]["share"] / res[8]["m"]
    assert res[8]["share"] < 12 * mib, res
    assert res[8]["share"] < 0.5 * res[1]["share"], res
    assert per_sample_8 < 40, res


def test_jpeg_geometry_agrees_with_pil() -> None:
    import io

    from dali_pipelines.pack import jpeg_geometry

    rng = np.random.default_rng(0)
    for mode, size, progressive in [("RGB", (112, 112), False), ("RGB", (80, 50), True), ("L", (112, 112), False),
                                    ("RGB", (300, 7), False), ("CMYK", (112, 112), False)]:
        im = Image.fromarray(rng.integers(0, 255, (size[1], size[0], len(mode)), np.uint8).squeeze(), mode)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", progressive=progressive)
        with Image.open(io.BytesIO(buf.getvalue())) as back:
            assert jpeg_geometry(buf.getvalue()) == (*back.size, len(back.getbands()))
    assert jpeg_geometry(b"\xff\xd8 not really") is None and jpeg_geometry(b"PNG") is None


def test_pack_writes_the_index_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dali_pipelines import dataset as dataset_mod

    root = _tree(tmp_path / "faces", ids=6)
    pack_folder(root, tmp_path / "o" / "t", shards=2, workers=1, progress=False)
    pack_folder(root, tmp_path / "o" / "p.rec", layout="plain", workers=1, progress=False)

    def boom(*a, **k):  # type: ignore[no-untyped-def]
        raise AssertionError("the first open re-read the data although pack stored the cache")

    monkeypatch.setattr(dataset_mod, "build_index", boom)
    a = FaceRecordDataset(tmp_path / "o" / "t.json")
    b = FaceRecordDataset(tmp_path / "o" / "p.rec")
    assert np.array_equal(a.labels, b.labels) and a.cache_path != b.cache_path
    assert not list((tmp_path / "o" / "t.pack").glob("*.arrays"))  # writer arrays cleaned up


def test_data_scale_benchmark_smoke(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("bench_data_scale", REPO / "benchmarks" / "bench_data_scale.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rec = tmp_path / "s.rec"
    bench.write_synthetic_plain(rec, 1000, 50, chunk=300)
    res = bench._measure("order", str(rec), 1, 2, 8, 0.0)
    assert res["images"] == 1000 and res["classes"] == 50 and res["order_len"] == 496 and res["memmap"]
    pk = bench.bench_pack(tmp_path, 45, per_id=10)
    assert pk["images"] == 45 and pk["images_per_s_1_worker"] > 0

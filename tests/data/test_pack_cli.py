"""``pack`` command and the data CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dali_pipelines import FaceRecordDataset
from dali_pipelines.cli import main
from dali_pipelines.decode import get_decoder
from dali_pipelines.pack import pack_folder

from .conftest import make_jpeg


def _tree(root: Path) -> Path:
    (root / "alice").mkdir(parents=True)
    (root / "bob").mkdir()
    (root / "carol").mkdir()
    (root / "empty").mkdir()
    (root / "alice" / "a1.jpg").write_bytes(make_jpeg(1))  # already 112x112 JPEG: kept as is
    Image.fromarray(np.full((200, 150, 3), 200, np.uint8)).save(root / "alice" / "a2.png")
    (root / "bob" / "b1.jpg").write_bytes(make_jpeg(2, size=64))  # resized
    (root / "bob" / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    (root / "bob" / "notes.txt").write_text("hi")
    Image.fromarray(np.zeros((112, 112), np.uint8)).save(root / "carol" / "gray.jpg")  # grayscale
    (root / "empty" / "bad.jpg").write_bytes(b"")
    return root


def test_pack_folder(tmp_path: Path) -> None:
    root = _tree(tmp_path / "faces")
    summary = pack_folder(root, tmp_path / "out.rec", workers=2, progress=False)
    assert (summary.identities, summary.images, summary.resized) == (3, 4, 3)
    reasons = dict(summary.skipped)
    assert "unsupported extension" in reasons[str(root / "bob" / "notes.txt")]
    assert "not a decodable image" in reasons[str(root / "bob" / "broken.jpg")]
    assert reasons[str(root / "empty" / "bad.jpg")] == "empty file"
    assert summary.empty_identities == ["empty"]
    assert summary.bytes == (tmp_path / "out.rec").stat().st_size
    text = summary.format()
    assert "4 images of 3 identities" in text and "skipped 3 files" in text

    ds = FaceRecordDataset(tmp_path / "out.rec")
    assert ds.layout == "insightface" and ds.labels.tolist() == [0, 0, 1, 2]
    assert ds.class_counts.tolist() == [2, 1, 1]
    assert bytes(ds.encoded_image(0)) == make_jpeg(1)
    decode = get_decoder()
    for i in range(4):
        assert decode(ds.encoded_image(i)).shape == (112, 112, 3)


def test_pack_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a directory"):
        pack_folder(tmp_path / "missing", tmp_path / "x.rec", progress=False)
    (tmp_path / "flat").mkdir()
    with pytest.raises(ValueError, match="no sub-folders"):
        pack_folder(tmp_path / "flat", tmp_path / "x.rec", progress=False)
    assert main(["pack", str(tmp_path / "missing"), str(tmp_path / "x.rec")]) == 2
    (tmp_path / "bad" / "a").mkdir(parents=True)
    (tmp_path / "bad" / "a" / "x.jpg").write_bytes(b"\xff\xd8 not an image")
    assert main(["pack", str(tmp_path / "bad"), str(tmp_path / "b.rec"), "--no-progress"]) == 1  # nothing packed


def test_cli_main_pack_and_synth(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _tree(tmp_path / "faces")
    assert main(["pack", str(root), str(tmp_path / "p.rec"), "--workers", "1", "--no-progress"]) == 0
    assert "4 images of 3 identities" in capsys.readouterr().out
    out = tmp_path / "syn"
    rc = main(["synth", "--out", str(out), "--identities", "3", "--images", "2", "--ver-identities", "3",
               "--ver-images", "2", "--ver-pairs", "4", "--cluster-identities", "2", "--cluster-images", "2",
               "--workers", "1", "--no-progress", "--seed", "5"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["train_images"] == 6 and summary["verification_pairs"] == 4
    assert FaceRecordDataset(out / "train.rec").num_classes == 3


def test_python_dash_m_entry_point(tmp_path: Path) -> None:
    out = tmp_path / "m"
    proc = subprocess.run(
        [sys.executable, "-m", "dali_pipelines", "synth", "--out", str(out), "--identities", "2",
         "--images", "2", "--ver-identities", "2", "--ver-images", "2", "--ver-pairs", "2",
         "--cluster-identities", "0", "--workers", "1", "--no-progress"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert (out / "train.rec").exists() and (out / "verification.bin").exists()


def test_import_has_no_side_effects() -> None:
    code = (
        "import sys, dali_pipelines, dali_pipelines.cli; "
        "assert 'nvidia.dali' not in sys.modules; "
        "assert not any(m == 'train' or m.startswith(('train.', 'partial_fc')) for m in sys.modules); "
        "print('ok')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_loader_benchmark_smoke(tmp_path: Path) -> None:
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_loader.py"
    spec = importlib.util.spec_from_file_location("bench_loader", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    rc = bench.main(["--synth-identities", "4", "--synth-images", "4", "--batch-size", "4", "--batches", "2",
                     "--warmup", "1", "--repeats", "1", "--threads", "1", "--workers", "0",
                     "--decoders", "pil", "--json", str(out)])
    assert rc == 0
    names = [r["name"] for r in json.loads(out.read_text())["results"]]
    assert any("PIL loop" in n for n in names) and any("DALI CPU" in n for n in names)
    assert any("torch fallback" in n for n in names)

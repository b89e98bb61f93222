"""``pfc pack --landmarks``: unaligned images with 5-point landmarks are aligned while packing.

The fixtures are the evaluation's: aligned synthetic faces warped into larger "loose" crops by
known similarity transforms (scikit-image's warp), with the template points moved along. Packing
the loose crops with their landmarks must store the aligned faces again.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dali_pipelines import FaceRecordDataset
from dali_pipelines.align import read_landmarks
from dali_pipelines.cli import main
from dali_pipelines.decode import get_decoder
from dali_pipelines.pack import pack_folder
from tests.unit.eval_fixtures import aligned_face, loose_crop, placed, write_jpeg

pytest.importorskip("cv2")
pytest.importorskip("skimage")

CASES = {  # identity folder -> [(gid, k, scale, angle)]
    "anna": [(3, 0, 1.6, 20.0), (3, 1, 1.25, -35.0)],
    "ben": [(8, 0, 2.0, 180.0)],
}


def _loose_tree(root: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """Writes the loose crops and ``landmarks.txt``; returns it and the aligned faces by key."""
    lines, faces = ["# name x1 y1 ... x5 y5 score"], {}
    for ident, items in CASES.items():
        for gid, k, scale, angle in items:
            face = aligned_face(gid, k)
            img, lm = loose_crop(face, *placed(scale, angle))
            key = f"{ident}/{k}.jpg"
            write_jpeg(root / key, img, quality=95)
            faces[key] = face
            lines.append(key + " " + " ".join(f"{v:.3f}" for v in lm.reshape(-1)) + " 0.99")
    lm_file = root.parent / "landmarks.txt"
    lm_file.write_text("\n".join(lines) + "\n")
    return lm_file, faces


def test_pack_aligns_loose_crops_with_their_landmarks(tmp_path):
    root = tmp_path / "loose"
    lm_file, faces = _loose_tree(root)
    summary = pack_folder(root, tmp_path / "aligned.rec", workers=1, progress=False, landmarks=lm_file)
    assert (summary.identities, summary.images, summary.resized) == (2, 3, 3)
    ds = FaceRecordDataset(tmp_path / "aligned.rec")
    decode = get_decoder()
    keys = sorted(faces)  # pack order: identities sorted, files sorted
    assert ds.labels.tolist() == [0, 0, 1]
    for i, key in enumerate(keys):
        got = decode(ds.encoded_image(i)).astype(np.float64)
        assert got.shape == (112, 112, 3)
        err = np.abs(got - faces[key])[4:-4, 4:-4].mean()
        assert err < 4.0, (key, err)  # two JPEG encodings and two bilinear resamplings
    # Without --landmarks the same tree is only resized: far from the aligned faces.
    plain = pack_folder(root, tmp_path / "plain.rec", workers=1, progress=False)
    assert plain.images == 3
    raw = decode(FaceRecordDataset(tmp_path / "plain.rec").encoded_image(0)).astype(np.float64)
    assert np.abs(raw - faces[keys[0]])[4:-4, 4:-4].mean() > 15.0


def test_every_image_needs_landmarks_and_bad_lines_are_named(tmp_path):
    root = tmp_path / "loose"
    lm_file, _ = _loose_tree(root)
    text = lm_file.read_text().splitlines()
    partial = tmp_path / "partial.txt"
    partial.write_text("\n".join(ln for ln in text if not ln.startswith("ben/")) + "\n")
    with pytest.raises(ValueError, match=r"1 image\(s\) .* no line in .*partial.txt, e\.g\. ben/0\.jpg"):
        pack_folder(root, tmp_path / "x.rec", progress=False, landmarks=partial)
    assert not (tmp_path / "x.rec").exists()  # refused before any work

    bad = tmp_path / "bad.txt"
    bad.write_text(text[1] + "\n" + "ben/0.jpg 1 2 3\n")
    with pytest.raises(ValueError, match=r"bad\.txt:2: expected NAME and 10 coordinates"):
        read_landmarks(bad)
    bad.write_text("anna/0.jpg 1 2 3 4 5 6 7 8 9 x\n")
    with pytest.raises(ValueError, match=r"bad\.txt:1: coordinates must be numbers"):
        read_landmarks(bad)
    assert main(["pack", str(root), str(tmp_path / "y.rec"), "--landmarks", str(bad), "--no-progress"]) == 2


def test_changed_landmarks_are_not_resumed_as_if_unchanged(tmp_path):
    root = tmp_path / "loose"
    lm_file, _ = _loose_tree(root)
    out = tmp_path / "sharded"
    first = pack_folder(root, out, workers=1, progress=False, shards=2, landmarks=lm_file)
    assert first.images == 3
    again = pack_folder(root, out, workers=1, progress=False, shards=2, landmarks=lm_file)
    assert again.resumed_shards == 2  # same input and landmarks: both shards kept
    # Different landmarks are different options: the old pack state is not silently reused.
    lm_file.write_text(lm_file.read_text().replace(" 0.99", " 0.98"))
    with pytest.raises(ValueError, match="different input folder or options"):
        pack_folder(root, out, workers=1, progress=False, shards=2, landmarks=lm_file)

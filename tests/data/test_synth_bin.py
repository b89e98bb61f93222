"""Synthetic identity generator and the safe verification .bin loader."""

from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from dali_pipelines import (
    FaceRecordDataset,
    UnsafePickleError,
    load_verification_bin,
    write_verification_bin,
)
from dali_pipelines.synth_faces import (
    SynthConfig,
    generate_synthetic_dataset,
    identity_params,
)

from .conftest import make_jpeg

TINY = SynthConfig(train_identities=8, images_per_identity=4, ver_identities=6, ver_images_per_identity=3,
                   ver_pairs=12, cluster_identities=4, cluster_images_per_identity=3, seed=42)


@pytest.fixture(scope="module")
def synth_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    a = tmp_path_factory.mktemp("synth_a")
    b = tmp_path_factory.mktemp("synth_b")
    c = tmp_path_factory.mktemp("synth_c")
    generate_synthetic_dataset(a, TINY, workers=2, progress=False)
    generate_synthetic_dataset(b, TINY, workers=1, progress=False)  # worker count must not matter
    generate_synthetic_dataset(c, SynthConfig(**{**TINY.__dict__, "seed": 43}), workers=1, progress=False)
    return a, b, c


def test_synth_deterministic_from_seed(synth_dirs: tuple[Path, Path, Path]) -> None:
    a, b, c = synth_dirs
    for name in ("train.rec", "train.idx", "verification.bin", "cluster.rec", "identities.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "train.rec").read_bytes() != (c / "train.rec").read_bytes()


def test_synth_outputs_and_disjoint_identities(synth_dirs: tuple[Path, Path, Path]) -> None:
    a = synth_dirs[0]
    train = FaceRecordDataset(a / "train.rec")
    assert train.layout == "insightface" and train.num_classes == 8 and len(train) == 32
    assert train.class_counts.tolist() == [4] * 8
    cluster = FaceRecordDataset(a / "cluster.rec")
    assert cluster.num_classes == 4 and len(cluster) == 12
    np.testing.assert_array_equal(np.load(a / "cluster_labels.npy"), cluster.labels)
    meta = json.loads((a / "identities.json").read_text())
    tr, ver, cl = (set(meta[k]["identities"]) for k in ("train", "verification", "clustering"))
    assert not (tr & ver) and not (tr & cl) and not (ver & cl)
    assert len(meta["train"]["difficulty"]) == 8
    assert all(0.0 <= d <= 1.0 for d in meta["train"]["difficulty"])
    pair_ids = {g for p in meta["verification"]["pairs"] for g in p}
    assert pair_ids <= ver
    images, issame = load_verification_bin(a / "verification.bin")
    assert len(images) == 24 and issame.dtype == bool and issame.shape == (12,)
    assert issame.any() and (~issame).any()
    assert all(im[:2] == b"\xff\xd8" for im in images)
    for (ga, gb), same in zip(meta["verification"]["pairs"], issame):
        assert (ga == gb) == bool(same)


def test_difficulty_spread() -> None:
    d = [identity_params(0, g)["difficulty"] for g in range(300)]
    assert min(d) < 0.1 and max(d) > 0.9  # some tight, some loose identities


def test_synth_images_vary_with_difficulty() -> None:
    from dali_pipelines.synth_faces import render_face

    def spread(diff: float) -> float:
        p = identity_params(0, 5)
        p["difficulty"] = diff
        imgs = np.stack([render_face(p, np.random.default_rng([9, k])).astype(np.float32) for k in range(8)])
        return float(imgs.std(axis=0).mean())

    assert spread(0.0) < spread(1.0)


def test_bin_round_trip(tmp_path: Path) -> None:
    imgs = [make_jpeg(i) for i in range(4)]
    p = write_verification_bin(tmp_path / "v.bin", imgs, [True, False])
    got, same = load_verification_bin(p)
    assert got == imgs and same.tolist() == [True, False]
    with pytest.raises(ValueError, match="2 images per pair"):
        write_verification_bin(tmp_path / "w.bin", imgs[:3], [True, False])


def test_bin_with_numpy_bool_array_loads(tmp_path: Path) -> None:
    p = tmp_path / "np.bin"
    with open(p, "wb") as f:
        pickle.dump(([b"a", b"b", b"c", b"d"], np.array([True, False])), f, protocol=2)
    imgs, same = load_verification_bin(p)
    assert imgs == [b"a", b"b", b"c", b"d"] and same.tolist() == [True, False]
    q = tmp_path / "npscalar.bin"
    with open(q, "wb") as f:
        pickle.dump(([b"a", b"b"], [np.bool_(True)]), f)
    assert load_verification_bin(q)[1].tolist() == [True]


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


class _EvalEvil:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (eval, ("__import__('os').getcwd()",))


def test_malicious_pickle_rejected_without_executing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.bin"
    bad.write_bytes(pickle.dumps(([b"a", b"b"], [_Evil(marker)])))
    with pytest.raises(UnsafePickleError, match=r"evil.bin: refusing to load global (posix|os)\.system"):
        load_verification_bin(bad)
    assert not marker.exists()
    bad2 = tmp_path / "eval.bin"
    bad2.write_bytes(pickle.dumps((_EvalEvil(), [True])))
    with pytest.raises(UnsafePickleError, match="builtins.eval"):
        load_verification_bin(bad2)
    # numpy object arrays may only hold allow-listed content too.
    bad3 = tmp_path / "objarr.bin"
    arr = np.empty(1, dtype=object)
    arr[0] = _Evil(marker)
    bad3.write_bytes(pickle.dumps(([b"a", b"b"], arr)))
    with pytest.raises(UnsafePickleError, match="refusing"):
        load_verification_bin(bad3)
    assert not marker.exists()


def test_bin_wrong_structure_rejected(tmp_path: Path) -> None:
    cases = {
        "notpair.bin": pickle.dumps([b"a"]),
        "strimg.bin": pickle.dumps((["a", "b"], [True])),
        "count.bin": pickle.dumps(([b"a"], [True])),
        "garbage.bin": b"not a pickle at all",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UnsafePickleError, match=name):
            load_verification_bin(tmp_path / name)
    buf = io.BytesIO()
    assert buf.getvalue() == b""


# ----------------------------------------------------------------------------- study options
STUDY = SynthConfig(train_identities=12, images_per_identity=4, ver_identities=8, ver_images_per_identity=3,
                    ver_pairs=12, cluster_identities=8, cluster_images_per_identity=2, seed=7, image_size=56,
                    family_size=4, family_fraction=1.0, family_share=0.9, size_distribution="powerlaw",
                    images_min=2, images_max=9, probe_images_per_identity=2)


def test_study_options_off_keep_the_old_record() -> None:
    assert "family_size" not in TINY.record() and not TINY.study_options
    assert TINY.class_sizes() == [4] * 8
    assert STUDY.record()["family_size"] == 4 and STUDY.study_options


def test_power_law_sizes_exact_quantiles_and_range() -> None:
    from dali_pipelines.synth_faces import power_law_sizes

    s = power_law_sizes(1000, 2, 200, 1.0, seed=0)
    assert min(s) == 2 and max(s) == 200
    # Log-uniform: the median is the geometric mean of the range (20), a tenth below ~3.2.
    assert abs(float(np.median(s)) - 20.0) <= 1.0
    assert sorted(s) == sorted(power_law_sizes(1000, 2, 200, 1.0, seed=1))  # same law, other order
    assert s != power_law_sizes(1000, 2, 200, 1.0, seed=1)
    steep = power_law_sizes(1000, 2, 200, 2.0, seed=0)
    assert np.median(steep) < np.median(s)  # a heavier tail of small classes
    with pytest.raises(ValueError, match="images_min"):
        SynthConfig(size_distribution="powerlaw", images_min=5, images_max=3)
    with pytest.raises(ValueError, match="family_share"):
        SynthConfig(family_share=1.5)


def test_family_members_share_parameters_but_not_difficulty() -> None:
    from dali_pipelines.synth_faces import family_of

    fam = family_of(0, 100, 10, 4, 1.0)
    assert fam == [100] * 4 + [104] * 4 + [108] * 2
    assert family_of(0, 100, 10, 1, 1.0) == [-1] * 10 and family_of(0, 100, 10, 4, 0.0) == [-1] * 10
    own = [identity_params(0, g) for g in (100, 101, 200)]
    mem = [identity_params(0, g, family=100, family_share=0.9) for g in (100, 101)]
    assert mem[0]["difficulty"] == own[0]["difficulty"] and mem[1]["difficulty"] == own[1]["difficulty"]
    keys = ("face_rx", "eye_dx", "mouth_w", "nose_len", "tex_freq")
    gap = lambda a, b: sum(abs(a[k] - b[k]) for k in keys)  # noqa: E731
    assert gap(mem[0], mem[1]) == pytest.approx(0.1 * gap(own[0], own[1]), rel=1e-9)
    assert mem[0]["glasses"] == mem[1]["glasses"]


def test_study_dataset_ground_truth_and_probe(tmp_path: Path) -> None:
    import csv

    s = generate_synthetic_dataset(tmp_path, STUDY, workers=1, progress=False)
    sizes = STUDY.class_sizes()
    train = FaceRecordDataset(tmp_path / "train.rec")
    assert train.class_counts.tolist() == sizes and s["train_images"] == sum(sizes)
    assert min(sizes) >= 2 and max(sizes) <= 9 and len(set(sizes)) > 1
    img = train.encoded_image(0)
    from PIL import Image

    assert Image.open(io.BytesIO(bytes(img))).size == (56, 56)
    probe = FaceRecordDataset(tmp_path / "probe.rec")
    assert len(probe) == 24 and probe.num_classes == 12
    np.testing.assert_array_equal(np.load(tmp_path / "probe_labels.npy"), probe.labels)
    # Probe images continue after the training images: none repeats a training image.
    assert not set(bytes(probe.encoded_image(i)) for i in range(len(probe))) & set(
        bytes(train.encoded_image(i)) for i in range(len(train)))
    meta = json.loads((tmp_path / "identities.json").read_text())
    assert meta["train"]["images"] == sizes and meta["train"]["family"] == [0] * 4 + [4] * 4 + [8] * 4
    assert meta["clustering"]["family"] == [20] * 4 + [24] * 4
    rows = list(csv.DictReader((tmp_path / "identities.csv").open()))
    assert len(rows) == 12 + 8 + 8
    tr = [r for r in rows if r["split"] == "train"]
    assert [int(r["images"]) for r in tr] == sizes
    assert [float(r["difficulty"]) for r in tr] == pytest.approx(meta["train"]["difficulty"], abs=1e-6)


def test_look_alikes_are_closer_in_pixels() -> None:
    """Family members' mean faces are closer than unrelated identities' (the test bed's point)."""
    from dali_pipelines.synth_faces import render_face

    def mean_face(seed: int, g: int, family: int) -> np.ndarray:
        p = identity_params(seed, g, (0.0, 0.0), family=family, family_share=0.9)
        # The face's centre: the background and lighting are random per image, not per identity.
        return np.mean([render_face(p, np.random.default_rng([seed, 1, g, k]), 56)[16:44, 16:40].astype(np.float32)
                        for k in range(8)], axis=0)

    fam = np.mean([np.abs(mean_face(s, 10, 10) - mean_face(s, 11, 10)).mean() for s in (3, 4, 5)])
    far = np.mean([np.abs(mean_face(s, 50, -1) - mean_face(s, 51, -1)).mean() for s in (3, 4, 5)])
    assert fam < 0.5 * far


def test_cli_study_options(tmp_path: Path) -> None:
    from dali_pipelines.cli import main

    out = tmp_path / "cli"
    rc = main(["synth", "--out", str(out), "--identities", "6", "--ver-identities", "2", "--ver-images", "2",
               "--ver-pairs", "4", "--cluster-identities", "3", "--cluster-images", "2", "--size", "32",
               "--family-size", "3", "--family-fraction", "1", "--sizes", "powerlaw", "--images-min", "2",
               "--images-max", "5", "--probe-images", "1", "--workers", "1", "--no-progress"])
    assert rc == 0
    meta = json.loads((out / "identities.json").read_text())
    assert meta["config"]["family_size"] == 3 and meta["train"]["family"] == [0, 0, 0, 3, 3, 3]
    assert len(FaceRecordDataset(out / "probe.rec")) == 6
    assert main(["synth", "--out", str(out), "--sizes", "powerlaw", "--images-min", "9", "--images-max", "3",
                 "--no-progress"]) == 2  # a clear error, not a traceback

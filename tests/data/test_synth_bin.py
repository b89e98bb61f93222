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
from dali_pipelines.synth import (
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
    from dali_pipelines.synth import render_face

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

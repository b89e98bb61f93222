"""MegaFace challenge 1: the streaming metrics equal a dense computation; the CLI on a MegaFace-style
pack (lists, aligned crops, noise lists)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from train.evaluate.megaface import MegaFaceStream, read_image_list
from train.evaluate.verification import tar_at_far

pytestmark = pytest.mark.timeout(120)


def dense(probes, labels, distractors, fars):
    """Everything in memory: the full score matrices, the devkit's rank-1 and TAR at FAR."""
    p = probes.astype(np.float32)
    sim = p @ p.T
    imp = p @ distractors.astype(np.float32).T  # [P, N]
    wins = trials = 0
    for i in range(len(labels)):
        for j in range(len(labels)):
            if i != j and labels[i] == labels[j]:
                trials += 1
                wins += sim[i, j] > imp[i].max()
    iu = np.triu_indices(len(labels), 1)
    same = labels[iu[0]] == labels[iu[1]]
    gen = sim[iu][same]
    scores = np.concatenate([gen, imp.ravel()]).astype(np.float64)
    issame = np.concatenate([np.ones(len(gen), bool), np.zeros(imp.size, bool)])
    return wins / trials, tar_at_far(scores, issame, fars)


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("block", [1, 37, 1000, 5000])
def test_streaming_equals_dense(block):
    rng = np.random.default_rng(block)
    ids, per, d = 12, 4, 16
    centers = rng.normal(size=(ids, d))
    labels = np.repeat(np.arange(ids), per)
    probes = unit(np.repeat(centers, per, 0) + 0.9 * rng.normal(size=(ids * per, d)))
    distractors = unit(rng.normal(size=(3000, d)))
    fars = (1e-5, 1e-4, 1e-3, 1e-2)
    s = MegaFaceStream(probes, labels, len(distractors), fars)
    for i in range(0, len(distractors), block):
        s.update(distractors[i : i + block])
    r = s.result()
    rank1, tar = dense(probes, labels, distractors, fars)
    assert r.rank1 == pytest.approx(rank1, abs=1e-12)
    assert 0.05 < rank1 < 0.95  # not a degenerate fixture: the comparison can fail
    for f in fars:
        if np.isnan(tar[f]):
            assert np.isnan(r.tar_at_far[f])
        else:
            assert r.tar_at_far[f] == pytest.approx(tar[f], abs=1e-12), f
    assert r.num_impostor == 48 * 3000 and r.impostor_histogram.sum() == 48 * 3000
    assert s.tail.numel() == int(1e-2 * 48 * 3000) + 1  # only the tail is kept


def test_stream_checks_the_count():
    s = MegaFaceStream(unit(np.eye(4)[:2] + 0.1), np.array([0, 0]), 5)
    s.update(unit(np.ones((3, 4))))
    with pytest.raises(ValueError, match="fed 3 distractors, expected 5"):
        s.result()


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    pytest.importorskip("skimage")
    from tests.unit.eval_fixtures import aligned_face, write_jpeg

    root = tmp_path_factory.mktemp("megaface")
    probes = []
    for ident in range(4):
        for k in range(3):
            p = f"Person_{ident}/Person_{ident}_{k}.png.jpg"
            write_jpeg(root / "facescrub_images" / p, aligned_face(40 + ident, k))
            probes.append(p)
    dis = []
    for k in range(30):
        p = f"{k % 3}/{k}/{k}_0.jpg"
        write_jpeg(root / "megaface_images" / p, aligned_face(100 + k, 0))
        dis.append(p)
    (root / "facescrub_lst").write_text("\n".join(probes) + "\n")
    (root / "megaface_lst").write_text("\n".join(dis) + "\n")
    (root / "facescrub_noises.txt").write_text("# noise\nPerson_1_2.png.jpg\n")
    (root / "megaface_noises.txt").write_text(f"{dis[3]}\n")
    return root, probes, dis


def test_cli_on_a_megaface_pack(pack, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from tests.unit.test_eval_inputs import tiny_onnx
    from train.evaluate.cli import main as eval_main
    from train.evaluate.embedders import ImageSource, load_embedder
    from train.export import INPUT_NORMALIZATION

    root, probes, dis = pack
    model = tiny_onnx(tmp_path / "m.onnx", dim=24, metadata={"input_normalization": INPUT_NORMALIZATION})
    out = tmp_path / "o"
    assert eval_main(["--onnx", str(model), "--megaface", str(root), "--megaface-distractors", "20",
                      "--megaface-block", "7", "--workers", "0", "--no-progress", "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())["megaface"]
    assert m["num_probes"] == 11 and m["num_distractors"] == 20
    assert m["noise_dropped"] == {"facescrub": 1, "megaface": 1}
    # the same figures from features computed here, densely
    emb = load_embedder(onnx=model)
    kept_p = [p for p in probes if p != "Person_1/Person_1_2.png.jpg"]
    kept_d = [d for d in dis if d != dis[3]][:20]
    pf = emb.embed(ImageSource(root / "facescrub_images").load(kept_p), flip=True).numpy()
    df = emb.embed(ImageSource(root / "megaface_images").load(kept_d), flip=True).numpy()
    labels = np.array([int(p.split("/")[0].split("_")[1]) for p in kept_p])
    rank1, tar = dense(pf, labels, df, (1e-6,))
    assert m["rank1"] == pytest.approx(rank1, abs=1e-12) and m["tar_at_far"]["1e-06"] is None and np.isnan(tar[1e-6])
    assert "## MegaFace challenge 1" in (out / "report.md").read_text()
    # too few distractors, a missing image, a bad list line: named errors
    assert eval_main(["--onnx", str(model), "--megaface", str(root), "--megaface-distractors", "1000",
                      "--workers", "0", "--out", str(out)]) == 2
    assert "1000 distractors asked, the list has 29" in capsys.readouterr().err
    (root / "megaface_lst").write_text("\n".join(dis + ["9/nope.jpg"]) + "\n")
    (root / "megaface_noises.txt").unlink()
    assert eval_main(["--onnx", str(model), "--megaface", str(root), "--megaface-distractors", "31",
                      "--workers", "0", "--no-progress", "--out", str(out)]) == 2
    assert "megaface_images/9/nope.jpg, which does not exist" in capsys.readouterr().err
    bad = tmp_path / "lst"
    bad.write_text("a/b.jpg\n\n../x.jpg\n")
    with pytest.raises(ValueError, match=r"lst:3: image path '../x.jpg'"):
        read_image_list(bad, "list")

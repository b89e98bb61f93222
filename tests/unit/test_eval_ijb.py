"""IJB-B/C 1:1 on the insightface release layout, against a straight-line implementation of the
published recipe (insightface's IJB evaluation, N1 D1 F1) written here in numpy + scikit-learn."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("skimage")
pytest.importorskip("onnxruntime")
sk_metrics = pytest.importorskip("sklearn.metrics")
from sklearn.preprocessing import normalize as sk_normalize  # noqa: E402

from dali_pipelines.align import align_face  # noqa: E402
from dali_pipelines.decode import get_decoder  # noqa: E402
from tests.unit.eval_fixtures import make_ijb_release  # noqa: E402
from tests.unit.test_eval_inputs import tiny_onnx  # noqa: E402
from train.evaluate.cli import main as eval_main  # noqa: E402
from train.evaluate.ijb import read_ijb_meta, tar_at_far_nearest  # noqa: E402
from train.evaluate.verification import FAR_GRID  # noqa: E402

FARS = FAR_GRID
pytestmark = pytest.mark.timeout(180)  # worker processes: never hang the suite


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("ijb") / "IJBC"
    truth = make_ijb_release(root, "IJBC", identities=5, templates_per_identity=3)
    from train.export import INPUT_NORMALIZATION

    model = tiny_onnx(root.parent / "m.onnx", dim=24, metadata={"input_normalization": INPUT_NORMALIZATION})
    return root, truth, model


def reference_scores(root, truth, model, *, flip=True, norm=True, detector=True, align=True):
    """The published recipe, spelled out image by image and template by template."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    decode = get_decoder("auto")
    feats = []
    for name, lm in zip(truth["names"], truth["landmarks"]):
        img = decode((root / "loose_crop" / name).read_bytes())
        if align:
            img = align_face(img, lm)
        else:
            from dali_pipelines.decode import fit_size

            img = fit_size(img, 112)
        x = ((img.astype(np.float32) - 127.5) / 127.5).transpose(2, 0, 1)[None]
        f = sess.run(None, {"x": x})[0][0].astype(np.float64)
        if flip:
            f = f + sess.run(None, {"x": np.ascontiguousarray(x[..., ::-1])})[0][0]
        feats.append(f)
    feats = np.asarray(feats)
    if not norm:
        feats = feats / np.sqrt((feats ** 2).sum(-1, keepdims=True))
    if detector:
        feats = feats * truth["scores"][:, None]
    templates, medias = truth["tid"], truth["mid"]
    uniq = np.unique(templates)
    tfeat = np.zeros((len(uniq), feats.shape[1]))
    for k, u in enumerate(uniq):
        (ind_t,) = np.where(templates == u)
        face, face_m = feats[ind_t], medias[ind_t]
        media_feats = []
        for m in np.unique(face_m):
            (ind_m,) = np.where(face_m == m)
            media_feats.append(face[ind_m].mean(0))
        tfeat[k] = np.sum(media_feats, axis=0)
    tfeat = sk_normalize(tfeat)
    index = {u: k for k, u in enumerate(uniq)}
    scores = np.array([tfeat[index[a]] @ tfeat[index[b]] for a, b, _ in truth["pairs"]])
    return scores


def reference_tars(scores, labels):
    fpr, tpr, _ = sk_metrics.roc_curve(labels, scores)  # the reference script's call (drop_intermediate)
    nearest = {f: float(tpr[np.argmin(np.abs(fpr - f))]) for f in FARS}
    neg, pos = scores[labels == 0], scores[labels == 1]
    at_most = {}
    for f in FARS:
        if f * len(neg) < 1:
            at_most[f] = None
            continue
        best = 0.0
        for t in np.unique(scores):
            if (neg >= t).mean() <= f:
                best = max(best, float((pos >= t).mean()))
        at_most[f] = best
    return nearest, at_most


@pytest.mark.parametrize("flags,kw", [((), {}),
                                      (("--no-ijb-raw-norm", "--no-ijb-detector-score", "--no-flip"),
                                       {"norm": False, "detector": False, "flip": False})])
def test_ijb_scores_and_tars_equal_the_reference(release, tmp_path, flags, kw):
    root, truth, model = release
    out = tmp_path / "o"
    assert eval_main(["--onnx", str(model), "--ijb", str(root), "--ijb-target", "ijbc", "--save-scores",
                      "--workers", "0", "--no-progress", "--out", str(out), *flags]) == 0
    got = np.load(out / "ijb_ijbc_scores.npy")
    want = reference_scores(root, truth, model, **kw)
    assert got.shape == (len(truth["pairs"]),)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    m = json.loads((out / "metrics.json").read_text())["ijb"]["IJBC"]
    nearest, at_most = reference_tars(want, truth["pairs"][:, 2])
    assert list(m["tar_at_far_nearest"]) == ["1e-06", "1e-05", "1e-04", "1e-03", "1e-02", "1e-01"]
    for f in FARS:
        assert m["tar_at_far_nearest"][f"{f:.0e}"] == pytest.approx(nearest[f], abs=1e-12)
        assert m["tar_at_far_at_most"][f"{f:.0e}"] == (None if at_most[f] is None else pytest.approx(at_most[f]))
    assert m["num_templates"] == 15 and m["num_pairs"] == 105 and m["num_images"] == len(truth["names"])
    assert m["settings"]["mode"] == ("N1 D1 F1" if not flags else "N0 D0 F0")
    assert "IJBC 1:1 verification" in (out / "report.md").read_text()


def test_ijb_recipe_switches_change_the_scores(release, tmp_path):
    root, truth, model = release
    a = reference_scores(root, truth, model)
    b = reference_scores(root, truth, model, detector=False)
    assert np.abs(a - b).max() > 1e-3  # the detector weighting matters on this fixture: the test can fail


def test_workers_give_the_same_scores(release, tmp_path):
    root, truth, model = release
    out = tmp_path / "o"
    assert eval_main(["--onnx", str(model), "--ijb", str(root), "--ijb-target", "IJBC", "--save-scores",
                      "--workers", "2", "--batch-size", "7", "--out", str(out)]) == 0
    np.testing.assert_allclose(np.load(out / "ijb_ijbc_scores.npy"), reference_scores(root, truth, model), atol=1e-6)


def test_both_rules_on_large_tied_scores():
    rng = np.random.default_rng(0)
    for trial in range(3):
        n = 100_000
        labels = rng.random(n) < 0.01
        scores = np.where(labels, rng.normal(0.6, 0.15, n), rng.normal(0.0, 0.1, n))
        scores = np.round(scores, 2 if trial % 2 else 6)  # ties, as float32 scores have
        fpr, tpr, _ = sk_metrics.roc_curve(labels, scores)
        got = tar_at_far_nearest(scores, labels, FARS)
        neg = np.sort(scores[~labels])[::-1]
        pos = scores[labels]
        for f in FARS:
            assert got[f] == tpr[np.argmin(np.abs(fpr - f))], (trial, f)
        # at most: the largest TAR over thresholds t with FAR(t) = #(neg >= t) / #neg <= f
        from train.evaluate.verification import tar_at_far

        at_most = tar_at_far(scores, labels, FARS)
        for f in FARS:
            if f * len(neg) < 1:
                assert np.isnan(at_most[f])
                continue
            cands = np.unique(scores)
            fa = len(neg) - np.searchsorted(np.sort(scores[~labels]), cands, side="left")
            ok = fa <= f * len(neg) + 1e-9
            ta = len(pos) - np.searchsorted(np.sort(pos), cands[ok], side="left")
            assert at_most[f] == pytest.approx(ta.max() / len(pos) if ok.any() else 0.0), (trial, f)


def _copy_release(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_malformed_lines_and_missing_images_are_named(release, tmp_path, capsys):
    root, truth, model = release
    r = _copy_release(root, tmp_path / "IJBC")
    meta = r / "meta"

    def run():
        rc = eval_main(["--onnx", str(model), "--ijb", str(r), "--ijb-target", "IJBC", "--workers", "0",
                        "--no-progress", "--out", str(tmp_path / "o")])
        return rc, capsys.readouterr().err

    f = meta / "ijbc_name_5pts_score.txt"
    good = f.read_text()
    lines = good.splitlines()
    f.write_text("\n".join(lines[:2] + [lines[2].rsplit(" ", 1)[0]] + lines[3:]) + "\n")
    rc, err = run()
    assert rc == 2 and "ijbc_name_5pts_score.txt:3:" in err and "12 columns" in err
    f.write_text(good)

    f = meta / "ijbc_face_tid_mid.txt"
    good = f.read_text()
    lines = good.splitlines()
    f.write_text("\n".join(lines[:4] + [lines[4].replace(" ", " x", 1)] + lines[5:]) + "\n")
    rc, err = run()
    assert rc == 2 and "ijbc_face_tid_mid.txt:5:" in err
    f.write_text(good)

    f = meta / "ijbc_template_pair_label.txt"
    good = f.read_text()
    lines = good.splitlines()
    for bad, match in (("101 102", "ijbc_template_pair_label.txt:7: expected"),
                       ("101 abc 1", "ijbc_template_pair_label.txt:7: expected"),
                       ("101 999 1", "pair 7 names template 999"),
                       ("101 102 2", "pair 7 has label 2")):
        f.write_text("\n".join(lines[:6] + [bad] + lines[7:]) + "\n")
        rc, err = run()
        assert rc == 2 and match in err, (bad, err)
    f.write_text(good)

    (r / "loose_crop" / "4.jpg").unlink()
    rc, err = run()
    assert rc == 2 and "loose_crop/4.jpg, which does not exist" in err

    with pytest.raises(ValueError, match="IJBB"):
        read_ijb_meta(r, "IJBX")
    with pytest.raises(FileNotFoundError, match="ijbb_name_5pts_score.txt"):
        read_ijb_meta(r, "IJBB")


def test_blocked_pair_scoring_equals_the_direct_products():
    from train.evaluate.ijb import score_template_pairs

    rng = np.random.default_rng(3)
    feats = sk_normalize(rng.normal(size=(57, 8)))
    ids = np.sort(rng.choice(10_000, 57, replace=False))
    t1, t2 = rng.choice(ids, 5000), rng.choice(ids, 5000)
    want = np.einsum("ij,ij->i", feats[np.searchsorted(ids, t1)], feats[np.searchsorted(ids, t2)])
    for block_bytes in (1, 8 * 57 * 5, 1 << 28):  # one template per block, 5 per block, one block
        np.testing.assert_allclose(score_template_pairs(ids, feats, t1, t2, block_bytes=block_bytes), want,
                                   atol=1e-12)
    with pytest.raises(ValueError, match="pair 2 names template 10001"):
        score_template_pairs(ids, feats, t1[:3], np.array([t2[0], 10_001, t2[2]]))

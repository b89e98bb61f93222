"""IJB-B clustering on protocol CSVs: parsing, the memory-bounded neighbour structures against
dense references, and the CLI end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("skimage")
pytest.importorskip("onnxruntime")
from sklearn.cluster import DBSCAN, AgglomerativeClustering  # noqa: E402
from sklearn.metrics import adjusted_rand_score  # noqa: E402

from tests.unit.eval_fixtures import make_ijbb_clustering  # noqa: E402
from tests.unit.test_eval_inputs import tiny_onnx  # noqa: E402
from train.evaluate.cli import main as eval_main  # noqa: E402
from train.evaluate.ijbb_clustering import (  # noqa: E402
    agglomerative_knn,
    dbscan_sparse,
    knn_cosine,
    radius_graph,
    read_clustering_csv,
)

pytestmark = pytest.mark.timeout(120)


def blobs(n_per=30, k=8, d=16, spread=0.25, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d))
    x = np.repeat(centers, n_per, 0) + spread * rng.normal(size=(k * n_per, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), np.repeat(np.arange(k), n_per)


def test_knn_and_radius_graph_equal_dense():
    x, _ = blobs()
    dense = 1.0 - x.astype(np.float64) @ x.T.astype(np.float64)
    np.fill_diagonal(dense, 0.0)
    idx, dist = knn_cosine(x, 7, block=50)
    want = np.sort(dense, axis=1)[:, :7]
    np.testing.assert_allclose(dist, want, atol=1e-5)
    assert (idx[:, 0] == np.arange(len(x))).all()
    np.testing.assert_allclose(dense[np.arange(len(x))[:, None], idx], want, atol=1e-5)
    g = radius_graph(x, 0.3, block=37)
    mask = dense <= 0.3
    assert g.nnz == mask.sum()
    np.testing.assert_allclose(g.toarray()[mask], np.clip(dense[mask], 0, None), atol=1e-5)


def test_sparse_dbscan_equals_sklearn_dense():
    x, y = blobs(spread=0.35)
    for eps in (0.15, 0.3):
        got, params = dbscan_sparse(x, min_samples=4, eps=eps, block=64)
        want = DBSCAN(eps=eps, min_samples=4, metric="cosine").fit_predict(x.astype(np.float64))
        assert ((got < 0) == (want < 0)).all() and adjusted_rand_score(got, want) == 1.0
        assert params["graph_edges"] > len(x)
    # the k-distance rule equals the dense rule of the small-set protocol
    from train.evaluate.clustering import dbscan_eps

    _, params = dbscan_sparse(x, min_samples=3, quantile=0.7, block=50)
    assert params["eps"] == pytest.approx(dbscan_eps(x, 3, 0.7), abs=1e-5)


def test_knn_agglomerative_equals_unconstrained_when_the_graph_is_complete():
    x, y = blobs(n_per=12, k=5, spread=0.5)
    got, _ = agglomerative_knn(x, 5, knn=len(x) - 1, block=16)
    want = AgglomerativeClustering(n_clusters=5, linkage="average", metric="cosine").fit_predict(x.astype(np.float64))
    assert adjusted_rand_score(got, want) == 1.0
    # a sparse graph with many components still gives exactly k clusters
    got, _ = agglomerative_knn(x, 5, knn=2, block=16)
    assert len(np.unique(got)) == 5


def test_knn_agglomerative_equals_sklearn_with_the_same_connectivity():
    from scipy.sparse import csr_matrix

    from train.evaluate.ijbb_clustering import _connect

    x, y = blobs(n_per=40, k=10, spread=0.6, seed=4)
    for knn, k in ((5, 10), (12, 7), (3, 25)):
        got, params = agglomerative_knn(x, k, knn=knn, block=64)
        idx, _ = knn_cosine(x, knn + 1)
        rows = np.repeat(np.arange(len(x)), knn)
        conn = csr_matrix((np.ones(len(rows)), (rows, idx[:, 1:].ravel())), shape=(len(x),) * 2)
        conn = _connect(((conn + conn.T) > 0).astype(float).tocsr(), x, 64)
        want = AgglomerativeClustering(n_clusters=k, linkage="average", metric="cosine",
                                       connectivity=conn).fit_predict(x.astype(np.float64))
        assert adjusted_rand_score(got, want) == 1.0, (knn, k)
        assert len(np.unique(got)) == k and params["graph_edges"] == (conn.nnz - (conn.diagonal() != 0).sum()) // 2


@pytest.fixture(scope="module")
def protocol(tmp_path_factory):
    root = tmp_path_factory.mktemp("ijbb")
    images, csvs, lms = make_ijbb_clustering(root)
    from train.export import INPUT_NORMALIZATION

    model = tiny_onnx(root / "m.onnx", dim=24, metadata={"input_normalization": INPUT_NORMALIZATION})
    return images, csvs, lms, model


def test_cli_runs_the_largest_subtasks(protocol, tmp_path):
    images, csvs, lms, model = protocol
    out = tmp_path / "o"
    assert eval_main(["--onnx", str(model), "--ijbb-clustering", str(csvs[0].parent), "--ijbb-largest", "1",
                      "--ijbb-images", str(images), "--ijbb-landmarks", str(lms), "--workers", "0", "--no-progress",
                      "--kmeans-n-init", "2", "--cluster-knn", "5", "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())["ijbb_clustering"]
    assert [s["name"] for s in m["subtasks"]] == ["clustering_5"] and m["subtasks"][0]["num_faces"] == 20
    assert [r["algorithm"] for r in m["runs"]] == ["kmeans", "dbscan", "agglomerative"]
    for r in m["runs"]:
        assert r["num_identities"] == 5 and 0.0 <= r["bcubed_f"] <= 1.0 and 0.0 <= r["nmi"] <= 1.0
    assert m["alignment"] == "landmarks"
    assert "IJB-B clustering (official subtasks)" in (out / "report.md").read_text()
    # both subtasks, box crops
    out2 = tmp_path / "p"
    assert eval_main(["--onnx", str(model), "--ijbb-clustering", *map(str, csvs), "--ijbb-images", str(images),
                      "--workers", "0", "--no-progress", "--algorithms", "kmeans", "--out", str(out2)]) == 0
    m2 = json.loads((out2 / "metrics.json").read_text())["ijbb_clustering"]
    assert [(s["name"], s["num_subjects"]) for s in m2["subtasks"]] == [("clustering_3", 3), ("clustering_5", 5)]
    assert m2["alignment"] == "box crop"


def test_csv_errors_name_file_and_line(protocol, tmp_path, capsys):
    images, csvs, lms, model = protocol
    lines = csvs[0].read_text().splitlines()
    bad = tmp_path / "bad.csv"
    for text, match in (
        ("\n".join([lines[0].replace("FACE_WIDTH", "W")] + lines[1:]), "bad.csv:1: header lacks ['FACE_WIDTH']"),
        ("\n".join(lines[:3] + [lines[3].replace(",img", ",x,img", 1).replace(",7", "")] + lines[4:]), "bad.csv:4:"),
        ("\n".join(lines[:5] + [lines[5].split(",", 1)[0] + ",abc," + lines[5].split(",", 2)[2]] + lines[6:]),
         "bad.csv:6: TEMPLATE_ID and SUBJECT_ID must be integers"),
        ("\n".join(lines[:2] + [lines[1]] + lines[2:]), "bad.csv:3: TEMPLATE_ID 1001 already on line 2"),
        ("\n".join(lines[:2] + [",".join(lines[2].split(",")[:3])] + lines[3:]), "bad.csv:3: 3 fields"),
        ("\n".join(lines[:2] + [lines[2].replace(",img", ",-3,img").rsplit(",", 4)[0] + ",0,10,7"] + lines[3:]),
         "bad.csv:3:"),
    ):
        bad.write_text(text + "\n")
        with pytest.raises(ValueError, match=match.replace("[", r"\[").replace("]", r"\]")):
            read_clustering_csv(bad)
    # a face whose image is missing: named, exit 2
    missing = tmp_path / "missing.csv"
    missing.write_text("\n".join(lines[:2] + [lines[2].replace("img/", "img/nope_")] + lines[3:]) + "\n")
    assert eval_main(["--onnx", str(model), "--ijbb-clustering", str(missing), "--ijbb-images", str(images),
                      "--workers", "0", "--no-progress", "--out", str(tmp_path / "o")]) == 2
    assert "img/nope_1002.jpg, which does not exist" in capsys.readouterr().err

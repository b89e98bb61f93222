"""`pfc eval` inputs that used to mislead: ONNX files without our metadata, a model whose real
embedding size differs from what it declares, empty .bin files, and --bin DIR with flip by default."""

from __future__ import annotations

import io
import json
import pickle

import numpy as np
import pytest
from PIL import Image

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from dali_pipelines.verification_bin import write_verification_bin  # noqa: E402
from train.evaluate.cli import _bin_files, main as eval_main  # noqa: E402
from train.evaluate.embedders import load_embedder  # noqa: E402
from train.evaluate.runner import load_pair_set  # noqa: E402


def tiny_onnx(path, dim=128, metadata=None, symbolic_output=True, size=112):
    """[N, 3, S, S] -> 14x14 average pool -> flatten -> linear to ``dim``: not mirror-symmetric."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    cells = 3 * (size // 14) ** 2
    w = numpy_helper.from_array(rng.normal(size=(cells, dim)).astype(np.float32), "W")
    nodes = [helper.make_node("AveragePool", ["x"], ["p"], kernel_shape=[14, 14], strides=[14, 14]),
             helper.make_node("Flatten", ["p"], ["f"], axis=1),
             helper.make_node("MatMul", ["f", "W"], ["y"])]
    out_shape = ["batch", "d"] if symbolic_output else ["batch", dim]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                          ["batch", 3, size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for k, v in (metadata or {}).items():
        e = model.metadata_props.add()
        e.key, e.value = k, v
    onnx.save(model, str(path))
    return path


def jpeg(seed):
    img = np.random.default_rng(seed).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def small_bin(path, pairs=20):
    write_verification_bin(path, [jpeg(i) for i in range(2 * pairs)], [bool(i % 2) for i in range(pairs)])
    return path


def test_onnx_without_metadata_is_refused_until_the_normalisation_is_stated(tmp_path, capsys):
    f = tiny_onnx(tmp_path / "foreign.onnx")
    with pytest.raises(ValueError, match=r"no 'input_normalization' metadata.*--input-mean 127.5 --input-std 127.5"):
        load_embedder(onnx=f)
    b = small_bin(tmp_path / "lfw.bin")
    assert eval_main(["--onnx", str(f), "--bin", str(b), "--out", str(tmp_path / "o")]) == 2
    assert "foreign.onnx carries no 'input_normalization' metadata" in capsys.readouterr().err
    # Stated: evaluated, and the report says under which normalisation and how it was known.
    assert eval_main(["--onnx", str(f), "--bin", str(b), "--input-mean", "127.5", "--input-std", "127.5",
                      "--out", str(tmp_path / "o")]) == 0
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["model"]["input_normalization"] == "(x - 127.5) / 127.5 on RGB uint8 pixels"
    assert "command line" in m["model"]["input_normalization_source"]
    assert m["model"]["embedding_size"] == 128


def test_stated_normalisation_is_applied(tmp_path):
    f = tiny_onnx(tmp_path / "foreign.onnx", dim=16)
    img = __import__("torch").from_numpy(
        np.random.default_rng(1).integers(0, 256, (2, 3, 112, 112), dtype=np.uint8))
    a = load_embedder(onnx=f, input_mean=127.5, input_std=127.5).embed(img, flip=False, normalize=False)
    b = load_embedder(onnx=f, input_mean=0.0, input_std=255.0).embed(img, flip=False, normalize=False)
    # The model is linear in its input: feats(x/255) = feats((x-127.5)/127.5) / 2 + feats(0.5).
    half = load_embedder(onnx=f, input_mean=-127.5, input_std=255.0).embed(
        __import__("torch").zeros(1, 3, 112, 112, dtype=__import__("torch").uint8), flip=False, normalize=False)
    np.testing.assert_allclose(b.numpy(), a.numpy() / 2 + half.numpy(), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("symbolic", [True, False])
def test_real_embedding_size_is_reported_not_the_declared_one(tmp_path, symbolic):
    from train.export import INPUT_NORMALIZATION

    f = tiny_onnx(tmp_path / "m.onnx", dim=128, symbolic_output=symbolic,
                  metadata={"input_normalization": INPUT_NORMALIZATION, "embedding_size": "512", "backbone": "r50"})
    emb = load_embedder(onnx=f)
    assert emb.embedding_size == 128 and emb.describe()["embedding_size"] == 128
    assert emb.describe()["declared_embedding_size"] == "512"
    with pytest.raises(ValueError, match="contradict"):
        load_embedder(onnx=f, input_mean=0.0, input_std=1.0)


def test_empty_bin_names_the_file(tmp_path, capsys):
    empty = tmp_path / "agedb_30.bin"
    empty.write_bytes(pickle.dumps(([], []), protocol=2))
    with pytest.raises(ValueError, match=r"agedb_30\.bin.*empty pair set"):
        load_pair_set(empty)
    from train.export import INPUT_NORMALIZATION

    f = tiny_onnx(tmp_path / "m.onnx", metadata={"input_normalization": INPUT_NORMALIZATION})
    assert eval_main(["--onnx", str(f), "--bin", str(empty), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "agedb_30.bin" in err and "stack" not in err


def test_bin_folder_in_the_usual_order_with_flip_by_default(tmp_path, capsys):
    from train.export import INPUT_NORMALIZATION

    d = tmp_path / "bins"
    d.mkdir()
    for name in ("cplfw", "zzz_extra", "lfw", "calfw", "agedb_30", "cfp_fp"):
        small_bin(d / f"{name}.bin", pairs=10)
    (d / "notes.txt").write_text("not a pair set")
    assert [p.stem for p in _bin_files([str(d)])] == ["lfw", "cfp_fp", "agedb_30", "calfw", "cplfw", "zzz_extra"]
    f = tiny_onnx(tmp_path / "m.onnx", metadata={"input_normalization": INPUT_NORMALIZATION})
    assert eval_main(["--onnx", str(f), "--bin", str(d), "--out", str(tmp_path / "o"), "--folds", "2"]) == 0
    out = capsys.readouterr().out
    table = out[out.index("pair sets (2-fold accuracy, flip on)"):]
    assert [ln.split()[0] for ln in table.splitlines()[2:8]] == ["lfw", "cfp_fp", "agedb_30", "calfw", "cplfw",
                                                                 "zzz_extra"]
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["flip"] is True and [v["name"] for v in m["verification"]][:2] == ["lfw", "cfp_fp"]
    assert eval_main(["--onnx", str(f), "--bin", str(d / "lfw.bin"), "--no-flip", "--out", str(tmp_path / "p"),
                      "--folds", "2"]) == 0
    n = json.loads((tmp_path / "p" / "metrics.json").read_text())
    assert n["flip"] is False
    assert n["verification"][0]["pos_mean"] != pytest.approx(m["verification"][0]["pos_mean"], abs=1e-6)
    empty = tmp_path / "none"
    empty.mkdir()
    assert eval_main(["--onnx", str(f), "--bin", str(empty), "--out", str(tmp_path / "q")]) == 2
    assert "holds no .bin" in capsys.readouterr().err

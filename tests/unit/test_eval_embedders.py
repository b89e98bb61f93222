"""Pieces of `pfc eval` that need no trained model: flip-test fusion, head margins from phi, errors."""

import pytest
import torch
import torch.nn.functional as F

from partial_fc import PartialFCHead
from partial_fc.cluster import concentration_stats, normalized_concentration
from partial_fc.distributed import ParallelContext
from partial_fc.margins import cluster_guided_margin
from train.evaluate.embedders import Embedder, load_embedder


def _embedder(forward, size=4):
    return Embedder(forward=forward, device=torch.device("cpu"), kind="test", source="-", backbone="-",
                    embedding_size=3, image_size=size)


def test_flip_fusion_sums_before_normalising():
    # A model that is not mirror-symmetric: features from the left and right image halves.
    def forward(x):
        return torch.stack([x[..., :2].sum((1, 2, 3)), x[..., 2:].sum((1, 2, 3)), torch.ones(x.shape[0])], 1)

    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (3, 3, 4, 4), dtype=torch.uint8, generator=g)
    x = (img.float() - 127.5) / 127.5
    e = _embedder(forward)
    plain = e.embed(img, batch_size=2)
    fused = e.embed(img, batch_size=2, flip=True)
    assert torch.allclose(plain, F.normalize(forward(x), dim=1), atol=1e-6)
    want = F.normalize(forward(x) + forward(torch.flip(x, dims=[3])), dim=1)
    assert torch.allclose(fused, want, atol=1e-6)
    assert not torch.allclose(plain, fused, atol=1e-3)


def test_embed_checks_the_images():
    e = _embedder(lambda x: x.flatten(1)[:, :3])
    with pytest.raises(ValueError, match="uint8"):
        e.embed(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="--image-size"):
        e.embed(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))


def test_head_class_margins_use_the_method():
    torch.manual_seed(0)
    head = PartialFCHead(num_classes=8, embedding_size=6, method="s6", sample_rate=1.0, m_min=0.3, m_max=0.7,
                         m=0.5)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5])  # classes 6 and 7 never seen
    for _ in range(3):
        head(torch.randn(12, 6), labels)
    phi, lam, params = head.class_margins()
    assert torch.isnan(phi[6:]).all() and torch.isfinite(phi[:6]).all()
    stats = concentration_stats(head.bank.phi(), ParallelContext())
    want_lam = normalized_concentration(phi, stats)
    assert torch.allclose(lam[:6], want_lam[:6])
    assert torch.allclose(params.m2[:6], cluster_guided_margin(want_lam[:6], 0.3, 0.7))
    assert torch.allclose(params.m2[6:], torch.full((2,), 0.5))  # unseen classes: the constant margin
    assert params.m2[:6].min() == pytest.approx(0.3) and params.m2[:6].max() == pytest.approx(0.7)


def test_head_class_margins_without_concentration():
    head = PartialFCHead(num_classes=5, embedding_size=4, method="arcface", m=0.45)
    phi, lam, params = head.class_margins()
    assert torch.isnan(phi).all() and torch.isnan(lam).all()
    assert torch.allclose(params.m2, torch.full((5,), 0.45))


def test_class_margins_during_warmup():
    head = PartialFCHead(num_classes=4, embedding_size=4, method="s6", sample_rate=1.0, margin_warmup_steps=100,
                         m=0.5)
    head(torch.randn(8, 4), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    phi, _, params = head.class_margins()
    assert torch.isfinite(phi).all() and torch.allclose(params.m2, torch.full((4,), 0.5))


def test_load_embedder_errors(tmp_path):
    with pytest.raises(ValueError, match="exactly one"):
        load_embedder()
    with pytest.raises(ValueError, match="exactly one"):
        load_embedder(weights="a.pt", onnx="b.onnx")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_embedder(checkpoint=tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        load_embedder(checkpoint=tmp_path)
    bad = tmp_path / "bad.pt"
    torch.save({"weights": torch.zeros(2)}, bad)
    with pytest.raises(ValueError, match="not a `pfc export` backbone file"):
        load_embedder(weights=bad)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="onnxruntime cannot load"):
        load_embedder(onnx=junk)
    with pytest.raises(ValueError, match="unknown device"):
        load_embedder(weights=bad, device="tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            load_embedder(weights=bad, device="cuda")


def test_concentration_by_difficulty_hand_case():
    import numpy as np

    from train.evaluate.concentration import ConcentrationReport, concentration_by_difficulty

    phi = np.array([0.1, 0.2, 0.3, 0.4, 0.5, np.nan])
    m2 = np.array([0.4, 0.4, 0.5, 0.6, 0.6, 0.5])
    rep = ConcentrationReport(method="s6", margin="cg_arcface", step=1, uses_concentration=True,
                              warmup_active=False, phi=phi, lam=phi, m2=m2, m3=np.zeros(6))
    out = concentration_by_difficulty(rep, np.array([0.0, 0.2, 0.4, 0.6, 0.8, 1.0]))
    assert out["spearman_phi"] == pytest.approx(1.0)  # phi grows with difficulty, class 5 unknown
    # Margin ranks with ties (0.4, 0.4 -> 1.5; 0.6, 0.6 -> 4.5) against 1..5: Pearson on ranks.
    r = np.corrcoef([1, 2, 3, 4, 5], [1.5, 1.5, 3, 4.5, 4.5])[0, 1]
    assert out["spearman_m2"] == pytest.approx(r)
    assert [t["num_classes"] for t in out["terciles"]] == [2, 1, 2]
    assert out["terciles"][0]["phi_mean"] == pytest.approx(0.15) and out["terciles"][2]["m2_mean"] == pytest.approx(0.6)
    reversed_ = concentration_by_difficulty(rep, np.array([1.0, 0.8, 0.6, 0.4, 0.2, 0.0]))
    assert reversed_["spearman_phi"] == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="6 classes"):
        concentration_by_difficulty(rep, np.zeros(3))


def test_pfc_dispatches_eval_and_reports_input_errors(tmp_path, capsys):
    from train.cli import main as pfc

    rc = pfc(["eval", "--checkpoint", str(tmp_path), "--bin", str(tmp_path / "missing.bin"), "--out", str(tmp_path)])
    assert rc == 2 and "missing.bin does not exist" in capsys.readouterr().err
    rc = pfc(["eval", "--onnx", "m.onnx", "--clustering-rec", str(tmp_path), "--cluster-sizes", "4,x",
              "--out", str(tmp_path)])
    assert rc == 2 and "--cluster-sizes must be comma-separated integers" in capsys.readouterr().err

import math

import pytest
import torch

from partial_fc import PRESETS, PartialFCConfig, PartialFCHead
from tests import reference as ref


def test_public_api_and_state_dict():
    head = PartialFCHead(num_classes=10, embedding_size=8, sample_rate=0.5, method="s6")
    assert head.weight.shape == (10, 8) and head.class_start == 0 and head.num_local_classes == 10
    keys = set(head.state_dict())
    assert {"weight", "step", "bank.centers", "bank.counts", "bank.mean_dist", "bank.dist_obs",
            "bank.class_counts"} <= keys
    out = head(torch.randn(4, 8), torch.tensor([1, 2, 3, 4]))
    assert {"loss", "ce", "con", "ali"} <= set(out)
    assert int(head.step) == 1


def test_arcface_has_no_bank_and_zero_aux_terms():
    head = PartialFCHead(num_classes=10, embedding_size=8)
    assert head.bank is None
    out = head(torch.randn(4, 8), torch.tensor([1, 2, 3, 4]))
    assert float(out["con"]) == 0.0 and float(out["ali"]) == 0.0
    assert PartialFCHead(num_classes=10, embedding_size=8, track_clusters=True).bank is not None


def test_matches_dense_reference_single_process():
    torch.manual_seed(0)
    head = PartialFCHead(num_classes=12, embedding_size=8, s=32.0, method="cosface", embedding_grad="exact")
    emb = torch.randn(6, 8, requires_grad=True)
    labels = torch.tensor([0, 3, 3, 7, 11, 5])
    out = head(emb, labels)
    out["loss"].backward()
    emb2 = emb.detach().clone().requires_grad_()
    w = head.weight.detach().clone().requires_grad_()
    loss = ref.margin_ce(emb2, w, labels, 1.0, 0.0, 0.4, 32.0)
    loss.backward()
    torch.testing.assert_close(out["loss"], loss)
    torch.testing.assert_close(emb.grad, emb2.grad)
    torch.testing.assert_close(head.weight.grad, w.grad)


def test_config_object_and_kwargs():
    cfg = PartialFCConfig(num_classes=20, embedding_size=4, method="s4")
    head = PartialFCHead(cfg, sample_rate=0.5)
    assert head.config.method == "s4" and head.config.sample_rate == 0.5
    assert head.aux == "contrastive" and not head.align


def test_unknown_option_suggests():
    with pytest.raises(TypeError, match="did you mean 'sample_rate'"):
        PartialFCHead(num_classes=10, sample_rat=0.1)
    with pytest.raises(ValueError, match="did you mean 'arcface'"):
        PartialFCHead(num_classes=10, method="arcfce")
    with pytest.raises(ValueError, match="sample_rate"):
        PartialFCHead(num_classes=10, sample_rate=0.0)
    with pytest.raises(ValueError, match="m_min"):
        PartialFCHead(num_classes=10, m_min=0.7, m_max=0.5)


def test_presets_cover_the_ablation():
    assert {"arcface", "cosface", "s1", "s2", "s3", "s4", "s5", "s6",
            "s2_center", "s2_triplet", "s6_center", "s6_triplet"} <= set(PRESETS)
    p = PRESETS["s6"]
    assert p.margin == "cg_arcface" and p.aux == "contrastive" and p.align
    assert PRESETS["s3"].margin == "arcface" and PRESETS["s3"].align and PRESETS["s3"].aux is None


def test_bad_inputs_single_process():
    head = PartialFCHead(num_classes=10, embedding_size=8)
    with pytest.raises(ValueError, match=r"outside \[0, 10\)"):
        head(torch.randn(2, 8), torch.tensor([1, 10]))
    with pytest.raises(ValueError, match=r"embeddings must be \[B, 8\]"):
        head(torch.randn(2, 7), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="labels must be"):
        head(torch.randn(2, 8), torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="integer"):
        head(torch.randn(2, 8), torch.tensor([1.0, 2.0]))
    with pytest.raises(FloatingPointError, match="non-finite"):
        head(torch.tensor([[math.inf] * 8, [0.0] * 8]), torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="num_classes"):
        PartialFCHead(embedding_size=8)


def test_eval_mode_does_not_update_state():
    head = PartialFCHead(num_classes=10, embedding_size=8, method="s6").eval()
    head(torch.randn(4, 8), torch.tensor([1, 2, 3, 4]))
    assert int(head.step) == 0 and int(head.bank.counts.sum()) == 0


def test_bank_and_phi_follow_training():
    torch.manual_seed(0)
    head = PartialFCHead(num_classes=6, embedding_size=8, method="s6", class_counts=torch.full((6,), 40))
    protos = torch.randn(6, 8)
    spread = torch.tensor([0.05, 0.05, 0.05, 1.0, 1.0, 1.0])  # classes 3-5 are loose
    for _ in range(20):
        labels = torch.arange(6).repeat(4)
        emb = protos[labels] + spread[labels, None] * torch.randn(24, 8)
        head(emb, labels)
    phi = head.concentration()
    assert phi[:3].max() < phi[3:].min(), "looser classes have larger phi"
    assert head.last_stats["margin_max"] > head.last_stats["margin_min"]


def test_bf16_autocast_keeps_fp32_loss():
    head = PartialFCHead(num_classes=10, embedding_size=8, method="s6")
    emb = torch.randn(4, 8, requires_grad=True)
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = head(emb, torch.tensor([1, 2, 3, 4]))
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert torch.isfinite(emb.grad).all()


def test_init_independent_of_world_size():
    from partial_fc import init_class_centers

    full = init_class_centers(0, 70000, 4, 0.01, 7)
    part = init_class_centers(65530, 100, 4, 0.01, 7)
    torch.testing.assert_close(part, full[65530:65630])


@pytest.mark.parametrize("method,to_features,to_weight", [("s2", True, False), ("s3", False, True),
                                                           ("s2_center", True, False), ("s2_triplet", True, False)])
def test_auxiliary_gradient_paths(method, to_features, to_weight):
    """Con/center/triplet send gradient to the features only; Ali to W only."""
    torch.manual_seed(0)
    labels = torch.arange(8) % 4
    warm = torch.randn(8, 8)
    grads = {}
    for name in ("arcface", method):
        head = PartialFCHead(num_classes=6, embedding_size=8, method=name, track_clusters=True, seed=1)
        head(warm, labels)  # fills the bank so the auxiliary terms are active
        head.weight.grad = None
        emb = torch.randn(8, 8, generator=torch.Generator().manual_seed(3)).requires_grad_()
        out = head(emb, labels)
        out["loss"].backward()
        grads[name] = (emb.grad.clone(), head.weight.grad.clone())
        if name == method:
            assert float((out["con"] + out["ali"]).detach()) > 0
    d_feat = (grads[method][0] - grads["arcface"][0]).abs().max()
    d_w = (grads[method][1] - grads["arcface"][1]).abs().max()
    assert (d_feat > 0) == to_features and (d_w > 0) == to_weight

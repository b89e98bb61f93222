"""Unit tests for partial_fc.backbones (CPU only, whole file well under 90 s on 2 cores)."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
import torch
from torch import nn

from partial_fc.backbones import build_backbone, list_backbones, register_backbone
from partial_fc.backbones.common import DropPath, count_parameters
from partial_fc.backbones.iresnet import IBasicBlock

ALL = ["iresnet_nano", "mobilefacenet", "r18", "r34", "r50", "r100", "r200",
       "vit_t", "vit_s", "vit_b", "vit_l"]  # fmt: skip
# Built for real and run at batch 2. r200 and vit_l only repeat the r100 / vit_b code paths
# with more blocks, so their shapes and sizes are checked on the meta device (no allocation).
REAL = [n for n in ALL if n not in ("r200", "vit_l")]
SMALL = ["iresnet_nano", "mobilefacenet", "vit_t"]

# Exact counts with num_features=512 catch accidental architecture changes.
PARAMS = {
    "iresnet_nano": 974_016,
    "mobilefacenet": 1_200_512,
    "r18": 24_025_088,
    "r34": 34_138_816,
    "r50": 43_590_336,
    "r100": 65_155_648,
    "r200": 118_833_408,
    "vit_t": 19_570_048,
    "vit_s": 49_755_904,
    "vit_b": 141_978_112,
    "vit_l": 378_207_232,
}

BN = nn.modules.batchnorm._BatchNorm


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _images(batch: int) -> torch.Tensor:
    # Same range as real inputs: (pixel - 127.5) / 127.5.
    return torch.rand(batch, 3, 112, 112) * 2 - 1


def _calibrated(model: nn.Module) -> nn.Module:
    """Gives BN realistic running statistics, then switches to eval.

    With the default running stats (mean 0, var 1) some random nets produce outputs near 1e-9
    in eval mode, which would make absolute-tolerance comparisons meaningless.
    """
    model.train()
    for m in model.modules():
        if isinstance(m, BN):
            m.momentum = None  # cumulative average: one batch sets the stats exactly
    with torch.no_grad():
        model(_images(8))
    return model.eval()


# --------------------------------------------------------------------------- registry


def test_registry_lists_all_backbones():
    assert list_backbones() == sorted(ALL)


def test_unknown_name_lists_available_and_suggests():
    with pytest.raises(ValueError) as err:
        build_backbone("r5O")
    msg = str(err.value)
    assert "'r5O'" in msg and "Did you mean 'r50'" in msg
    for name in ALL:
        assert name in msg


def test_unknown_kwarg_is_a_clear_type_error():
    with pytest.raises(TypeError, match=r"num_feature.*did you mean 'num_features'"):
        build_backbone("iresnet_nano", num_feature=128)
    with pytest.raises(TypeError, match=r"'r50'.*\['bogus'\].*accepted options"):
        build_backbone("r50", bogus=1)


def test_duplicate_registration_rejected():
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("r50")(lambda: nn.Identity())
    assert list_backbones() == sorted(ALL)


# --------------------------------------------------------------------------- shapes / sizes


@pytest.mark.parametrize("name", REAL)
def test_forward_shape_and_dtype(name):
    model = build_backbone(name, num_features=256).eval()
    with torch.no_grad():
        out = model(_images(2))
    assert out.shape == (2, 256)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ALL)
def test_parameter_counts_and_meta_shapes(name):
    # The meta device allocates nothing, so even vit_l (378M parameters) costs nothing here.
    with torch.device("meta"):
        model = build_backbone(name).eval()
        out = model(torch.empty(1, 3, 112, 112))
    assert out.shape == (1, 512)
    assert count_parameters(model) == PARAMS[name]


@pytest.mark.parametrize("name,reference", [("r50", 43.6e6), ("r100", 65.2e6)])
def test_iresnet_parameter_count_matches_arcface(name, reference):
    with torch.device("meta"):
        n = count_parameters(build_backbone(name, num_features=512))
    assert abs(n - reference) / reference < 0.01


def test_mobilefacenet_width_multiplier():
    with torch.device("meta"):
        sizes = [count_parameters(build_backbone("mobilefacenet", width_mult=w)) for w in (0.5, 1, 2)]
    assert sizes[0] < sizes[1] < sizes[2]
    assert 1e6 < sizes[1] < 2e6
    model = build_backbone("mobilefacenet", width_mult=0.5, num_features=128).eval()
    with torch.no_grad():
        assert model(_images(2)).shape == (2, 128)


def test_zero_init_residual():
    model = build_backbone("r18", zero_init_residual=True)
    blocks = [m for m in model.modules() if isinstance(m, IBasicBlock)]
    assert blocks and all(torch.count_nonzero(b.bn3.weight) == 0 for b in blocks)


def test_vit_token_grid():
    model = build_backbone("vit_t")
    assert model.num_patches == 144 and model.pos_embed.shape == (1, 144, 192)
    assert model.neck.fc.in_features == 144 * 192


# --------------------------------------------------------------------------- training behaviour


@pytest.mark.parametrize("name", SMALL)
def test_gradients_reach_every_parameter(name):
    model = build_backbone(name).train()
    out = model(_images(4))
    (out * torch.randn_like(out)).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        # A bias whose every downstream path starts with a batch-statistics BN (e.g. bn3.bias
        # of the last block of a stage) has a mathematically zero gradient in training mode,
        # so only weights must be nonzero.
        if not pname.endswith("bias"):
            assert p.grad.abs().sum() > 0, pname


def _stochastic_modules_to_eval(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, (BN, nn.Dropout, DropPath)):
            m.eval()


@pytest.mark.parametrize(
    "name,opts",
    [
        ("iresnet_nano", {"dropout": 0.3}),
        ("mobilefacenet", {"dropout": 0.3}),
        ("vit_t", {"dropout": 0.1, "drop_path_rate": 0.2, "attn_drop": 0.1}),
    ],
)
def test_train_eval_differ_only_through_bn_and_dropout(name, opts):
    model = _calibrated(build_backbone(name, **opts))
    x = _images(2)
    with torch.no_grad():
        ref = model.eval()(x)
        model.train()
        _stochastic_modules_to_eval(model)  # model.training stays True at the top level
        masked = model(x)
        # Last, because a train-mode forward updates the BN running statistics.
        train_out = model.train()(x)
    torch.testing.assert_close(masked, ref, rtol=0, atol=0)
    assert not torch.allclose(train_out, ref)  # sanity: the listed modules do act in training


@pytest.mark.parametrize("name", SMALL + ["r18"])
def test_channels_last_matches_contiguous(name):
    model = _calibrated(build_backbone(name))
    x = _images(2)
    with torch.no_grad():
        ref = model(x)
        cl_input = model(x.contiguous(memory_format=torch.channels_last))
        model = model.to(memory_format=torch.channels_last)
        cl_both = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(cl_input, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cl_both, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", [n for n in ALL if n.startswith("r") or "iresnet" in n])
def test_strided_1x1_convs_avoid_onednn_narrow_channel_bug(name):
    # oneDNN's channels_last 1x1 stride-2 conv backward corrupts the heap (or silently returns
    # wrong weight gradients) when in_channels < its SIMD block; see iresnet_nano.
    with torch.device("meta"):
        model = build_backbone(name)
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.stride != (1, 1):
            assert m.in_channels >= 16


def test_channels_last_training_gradients_match():
    ref_model = build_backbone("iresnet_nano").train()
    cl_model = build_backbone("iresnet_nano").train()
    cl_model.load_state_dict(ref_model.state_dict())
    cl_model = cl_model.to(memory_format=torch.channels_last)
    x = _images(4)
    w = torch.randn(4, 512)
    (ref_model(x) * w).sum().backward()
    (cl_model(x.contiguous(memory_format=torch.channels_last)) * w).sum().backward()
    overall = max(p.grad.abs().max().item() for p in ref_model.parameters())
    for (name, a), b in zip(ref_model.named_parameters(), cl_model.parameters()):
        # Tolerance relative to each tensor's largest gradient, plus a floor relative to the
        # model's largest: summation order differs between layouts, and the structurally zero
        # bias gradients (see test_gradients_reach_every_parameter) are pure rounding noise.
        # The oneDNN bug this guards against gives errors of 100x, not 1e-4.
        scale = a.grad.abs().max().item()
        assert (a.grad - b.grad).abs().max().item() <= 1e-4 * scale + 1e-6 * overall, name


@pytest.mark.parametrize("name", SMALL)
def test_embedding_neck_stays_fp32_under_autocast(name):
    model = _calibrated(build_backbone(name))
    seen = {}
    trunk = [m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
             and not n.startswith("neck")]  # fmt: skip
    trunk[-1].register_forward_hook(lambda m, a, o: seen.__setitem__("trunk_out", o.dtype))
    model.neck.fc.register_forward_pre_hook(lambda m, a: seen.__setitem__("fc_in", a[0].dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(_images(2))
    assert seen["trunk_out"] == torch.bfloat16  # proves the trunk really ran under autocast
    assert seen["fc_in"] == torch.float32
    assert out.dtype == torch.float32
    assert model.neck.fc.weight.dtype == torch.float32


def test_no_hardcoded_cuda_calls():
    root = pathlib.Path(__file__).resolve().parents[2] / "partial_fc" / "backbones"
    for path in root.glob("*.py"):
        assert ".cuda(" not in path.read_text(), path


# --------------------------------------------------------------------------- ONNX


@pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export")
@pytest.mark.parametrize("name,dynamo", [("iresnet_nano", True), ("mobilefacenet", False)])
def test_onnx_export_dynamic_batch_parity(name, dynamo, tmp_path):
    """Both exporters work with torch 2.13; each model uses one to keep the file fast.

    dynamo=True (torch.export-based) is the default since torch 2.9 and takes 5-10 s here;
    dynamo=False (TorchScript) takes ~0.5 s but is deprecated.
    """
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed")
    if dynamo:
        pytest.importorskip("onnxscript", reason="the dynamo ONNX exporter needs onnxscript")
    model = _calibrated(build_backbone(name))
    path = tmp_path / f"{name}.onnx"
    names = {"input_names": ["images"], "output_names": ["embeddings"]}
    if dynamo:
        torch.onnx.export(
            model,
            (_images(2),),
            str(path),
            dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4096)}},
            dynamo=True,
            external_data=False,
            verbose=False,
            **names,
        )
    else:
        torch.onnx.export(
            model,
            (_images(2),),
            str(path),
            dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}},
            dynamo=False,
            **names,
        )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        x = _images(batch)
        got = session.run(None, {"images": x.numpy()})[0]
        with torch.no_grad():
            want = model(x).numpy()
        assert got.shape == (batch, 512)
        assert np.abs(got - want).max() <= 1e-4

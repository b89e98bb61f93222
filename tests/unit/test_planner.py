"""The memory planner against hand arithmetic and against the tensors of a real head; `pfc plan`."""

from __future__ import annotations

import math

import pytest
import torch

from partial_fc import PartialFCHead
from partial_fc.backbones import build_backbone
from partial_fc.optim import SparseRowSGD
from partial_fc.planner import BACKBONE_TABLE, PlanConfig, plan_memory
from train.plan import main as plan_main


def test_hand_arithmetic_webface42m():
    plan = plan_memory(PlanConfig(num_classes=2_059_906, embedding_size=512, world_size=8, sample_rate=0.3,
                                  batch=128, method="s6"))
    shard = 257_489  # ceil(2,059,906 / 8)
    k = 77_247  # ceil(0.3 * 257,489)
    assert (plan.shard_classes, plan.sampled_classes, plan.global_batch) == (shard, k, 1024)
    assert plan.get("head weights") == shard * 512 * 4 == 527_337_472
    assert plan.get("head optimizer state") == shard * 512 * 4
    assert plan.get("head gradient") == k * 512 * 4
    assert plan.get("cluster bank + concentrations") == shard * (512 * 4 + 28)
    nk, kd = 1024 * k * 4, k * 512 * 4
    chunk_tmp = 4 * 4096 * 512 * 4  # one backward chunk of the CE: four [4096, D] temporaries
    # The CE's fused [N, K] buffer; the fused Con term: three [N, 8192] and two [8192, D] chunk
    # transients plus two [N, D] tensors, independent of K.
    con = 3 * 1024 * 8192 * 4 + 2 * 8192 * 512 * 4 + 2 * 1024 * 512 * 4
    assert plan.get("head activations (peak)") == nk + chunk_tmp + con
    assert plan.con_sampled_classes == k
    assert plan.allgather_bytes == 7 * 128 * (512 * 4 + 8)  # embeddings fp32 + int64 labels from 7 peers
    assert plan.reduce_scatter_bytes == 7 * 128 * 512 * 4
    assert plan.fits is None


def test_fused_chunk_constant_matches_kernel():
    import partial_fc.fused
    import partial_fc.planner

    assert partial_fc.planner.FUSED_CHUNK == partial_fc.fused._CHUNK


def test_con_sample_rate_sizes_the_con_sample_not_its_memory():
    base = dict(num_classes=2_059_906, world_size=8, sample_rate=0.3, method="s6")
    small = plan_memory(PlanConfig(**base, con_sample_rate=0.05))
    assert small.con_sampled_classes == math.ceil(0.05 * 257_489) and small.sampled_classes == 77_247
    tiny = plan_memory(PlanConfig(**base, con_sample_rate=0.001))
    assert tiny.con_sampled_classes == 258  # ceil(0.001 * 257,489); positives (~128 per shard) fewer
    floor = plan_memory(PlanConfig(**base, con_sample_rate=1e-6))
    assert floor.con_sampled_classes == 128  # at least the shard's expected positives (N / world)
    default = plan_memory(PlanConfig(**base))
    # Both exceed one chunk, so the Con term's transients are the same size.
    assert small.get("head activations (peak)") == default.get("head activations (peak)")
    chunk_small = plan_memory(PlanConfig(**base, con_sample_rate=0.01))  # K_con = 2,575 < 8,192
    assert default.get("head activations (peak)") - chunk_small.get("head activations (peak)") == (
        3 * 1024 * (8192 - 2575) * 4 + 2 * (8192 - 2575) * 512 * 4)
    assert plan_memory(PlanConfig(**{**base, "method": "arcface"}, con_sample_rate=0.05)).con_sampled_classes == 0
    with pytest.raises(ValueError, match="con_sample_rate"):
        PlanConfig(**base, con_sample_rate=1.5)


def test_dense_update_sgd_vs_adamw_and_backbone():
    base = dict(num_classes=1000, embedding_size=64, world_size=4, sample_rate=0.1, batch=16, dtype="bf16")
    lazy = plan_memory(PlanConfig(**base))
    dense = plan_memory(PlanConfig(**base, row_update="dense", optimizer="adamw"))
    row = 250 * 64 * 4
    assert lazy.get("head gradient") == 25 * 64 * 4 and dense.get("head gradient") == row
    assert dense.get("head optimizer state") == 2 * row
    assert dense.get("head activations (peak)") - lazy.get("head activations (peak)") == row + 25 * 64 * 4
    assert lazy.get("cluster bank + concentrations") == 0
    withbb = plan_memory(PlanConfig(**base, backbone="r50"))
    params, per_sample = BACKBONE_TABLE["r50"]
    assert withbb.get("backbone weights + gradients") == 2 * 4 * params
    assert withbb.get("backbone activations") == per_sample * 16 * 2 // 4
    assert withbb.total - lazy.total == 3 * 4 * params + per_sample * 16 // 2


def test_fits_verdict_and_errors():
    cfg = dict(num_classes=2_059_906, world_size=8, sample_rate=0.3, method="s6", backbone="r100", dtype="bf16")
    assert plan_memory(PlanConfig(**cfg, gpu_memory_gib=80)).fits is True
    assert plan_memory(PlanConfig(**cfg, gpu_memory_gib=4)).fits is False
    with pytest.raises(ValueError, match="sample_rate"):
        PlanConfig(num_classes=10, sample_rate=0.0)
    with pytest.raises(ValueError, match="unknown backbone"):
        PlanConfig(num_classes=10, world_size=1, backbone="r101")
    with pytest.raises(ValueError, match="at least world_size"):
        PlanConfig(num_classes=3, world_size=8)


def test_state_matches_a_real_head():
    """Weights, optimizer state, bank and gradient: the planner's bytes are the real tensors' bytes."""
    cfg = PlanConfig(num_classes=1003, embedding_size=32, world_size=1, sample_rate=0.2, batch=24, method="s6")
    plan = plan_memory(cfg)
    head = PartialFCHead(num_classes=1003, embedding_size=32, sample_rate=0.2, method="s6")
    opt = SparseRowSGD([head.weight], lr=0.1, momentum=0.9)
    emb = torch.randn(24, 32, requires_grad=True)
    head(emb, torch.randint(0, 1003, (24,)))["loss"].backward()
    g = head.weight.grad
    assert g.is_sparse and g._values().numel() * 4 == plan.get("head gradient")
    assert g._values().shape[0] == plan.sampled_classes == math.ceil(0.2 * 1003)
    opt.step()
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    assert nbytes([head.weight]) == plan.get("head weights")
    assert nbytes(opt.state[head.weight].values()) == plan.get("head optimizer state")
    assert nbytes(head.bank.buffers()) == plan.get("cluster bank + concentrations")


def test_backbone_table_parameter_counts_are_exact():
    for name in ("iresnet_nano", "mobilefacenet"):
        assert sum(p.numel() for p in build_backbone(name).parameters()) == BACKBONE_TABLE[name][0]


def test_plan_cli(capsys):
    rc = plan_main(["--classes", "2059906", "--world-size", "8", "--sample-rate", "0.3", "--method", "s6",
                    "--backbone", "r100", "--dtype", "bf16", "--gpu-memory-gib", "80"])
    out = capsys.readouterr().out
    assert rc == 0 and "fits in 80 GiB" in out and "head weights" in out and "257,489" in out
    assert "all-gather received per rank per step" in out and "Con candidates per step: 77,247" in out
    plan_main(["--classes", "2059906", "--sample-rate", "0.3", "--method", "s6", "--con-sample-rate", "0.05"])
    assert "Con candidates per step: 12,875" in capsys.readouterr().out
    rc = plan_main(["--classes", "2059906", "--world-size", "1", "--sample-rate", "0.3", "--gpu-memory-gib", "8"])
    assert rc == 1 and "does NOT fit in 8 GiB" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        plan_main(["--classes", "100", "--sample-rate", "1.5"])
    assert "sample_rate must be in (0, 1]" in capsys.readouterr().err


def test_pfc_plan_subcommand_dispatch(capsys):
    from train.cli import main as cli_main

    assert cli_main(["plan", "--classes", "1000", "--world-size", "2"]) == 0
    assert "largest shard: 500 classes" in capsys.readouterr().out

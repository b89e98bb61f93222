"""CUDA paths of the head and the trainer (marked gpu: skipped without CUDA; benchmarks/gpu_check.sh
runs them on the first GPU machine)."""

from __future__ import annotations

import pytest
import torch

from partial_fc import PartialFCHead
from partial_fc.optim import SparseRowSGD
from tests import reference as ref

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("method,m", [("arcface", (1.0, 0.5, 0.0)), ("cosface", (1.0, 0.0, 0.4))])
def test_head_on_cuda_matches_fp64_cpu_reference(method, m, dtype):
    g = torch.Generator().manual_seed(0)
    emb64 = torch.randn(64, 128, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3000, (64,), generator=g)
    head = PartialFCHead(num_classes=3000, embedding_size=128, method=method, s=64.0, embedding_grad="exact",
                         row_update="dense", device=torch.device("cuda"))
    w64 = head.weight.detach().double().cpu().requires_grad_()
    e64 = emb64.clone().requires_grad_()
    loss_ref = ref.margin_ce(e64, w64, labels, *m, 64.0)
    loss_ref.backward()
    emb = emb64.float().cuda().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        out = head(emb, labels.cuda())
    assert out["loss"].dtype == torch.float32
    out["loss"].backward()
    if dtype == "fp32":
        torch.testing.assert_close(out["loss"].double().cpu(), loss_ref.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(emb.grad.double().cpu(), e64.grad, rtol=1e-3, atol=1e-6)
        torch.testing.assert_close(head.weight.grad.double().cpu(), w64.grad, rtol=1e-3, atol=1e-6)
    else:
        assert abs(float(out["loss"].detach()) - float(loss_ref)) / float(loss_ref) < 3e-2
        cos = torch.nn.functional.cosine_similarity
        assert float(cos(emb.grad.double().cpu().flatten(), e64.grad.flatten(), dim=0)) > 0.99
        assert float(cos(head.weight.grad.double().cpu().flatten(), w64.grad.flatten(), dim=0)) > 0.99


def test_s6_lazy_rows_on_cuda_deterministic_and_finite():
    def run():
        head = PartialFCHead(num_classes=5000, embedding_size=64, method="s6", sample_rate=0.3,
                             device=torch.device("cuda"))
        opt = SparseRowSGD([head.weight], lr=0.1, momentum=0.9, weight_decay=5e-4)
        losses = []
        for step in range(4):
            g = torch.Generator().manual_seed(step)
            emb = torch.randn(32, 64, generator=g).cuda().requires_grad_()
            labels = torch.randint(0, 500, (32,), generator=g).cuda()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = head(emb, labels)
            out["loss"].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(out["loss"]))
        return losses, head.weight.detach().cpu(), head.last_stats

    a, wa, stats = run()
    b, wb, _ = run()
    assert all(torch.isfinite(torch.tensor(a)))
    assert a == b and torch.equal(wa, wb)  # the sampler's CUDA generator is seeded per step
    assert stats["num_sampled_local"] >= 1500 and "phi_mean" in stats


def test_trainer_steps_on_cuda_with_documented_host_reads(tmp_path):
    from train.config import load_config
    from train.host_syncs import check_counts, count_host_reads
    from train.trainer import Trainer

    sets = {"run.output_dir": f'"{tmp_path}"', "run.name": '"cuda"', "run.max_steps": 4, "run.log_every": 100,
            "run.device": '"cuda"', "precision.dtype": '"bf16"', "data.kind": '"synthetic"',
            "data.train_rec": '""', "data.batch_size": 16, "data.synth.identities": 50,
            "data.synth.images_per_identity": 8, "checkpoint.resume": '"none"', "checkpoint.every_steps": 2,
            "evaluation.bin_files": "[]", "evaluation.every_steps": 0, "metrics.prometheus": "false",
            "metrics.progress_bar": "false", "export.onnx": "false", "backbone.channels_last": "true"}
    t = Trainer(load_config("cpu_demo", [f"{k}={v}" for k, v in sets.items()]), handle_signals=False)
    try:
        with count_host_reads() as counter:
            def on_step(step, _images):
                counter.active = step == 3  # the end of step 3 and step 4 up to its optimizer step: no checkpoint

            summary = t.fit(on_step=on_step)
    finally:
        t.close()
    assert summary["step"] == 4 and summary["skipped_steps"] == 0
    assert all(torch.isfinite(torch.tensor(v)) for v in summary["final_loss"].values())
    assert not check_counts(counter.counts, steps=1)


def test_step_timer_reset_reads_nothing_on_cuda():
    from train.metrics import StepTimer

    timer = StepTimer("cuda")
    x = torch.randn(512, 512, device="cuda")
    with timer.phase("forward"):
        x = x @ x
    timer.reset()
    assert timer.collect() == {}
    with timer.phase("forward"):
        x = x @ x
    assert timer.collect()["forward"] > 0

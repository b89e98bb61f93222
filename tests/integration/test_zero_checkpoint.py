"""DeepSpeed ZeRO-1/2: the backbone optimizer state is in the checkpoint, gathered by parameter name.

An interrupted run (its step-3 checkpoint resumed in a fresh job) ends bit-identical to the
uninterrupted one: backbone, head, and the backbone's momentum. The same checkpoint continues on
another world size (the by-name layout does not depend on how ZeRO partitioned it).
"""

from __future__ import annotations

import pytest
import torch

from . import util

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# The fallback loader: position-exact on resume, and faster to start than DALI.
SYNTH = {"data.kind": '"torch"', "data.num_workers": 0, "evaluation.bin_files": "[]", "checkpoint.keep_last": 0,
         "distributed.engine": '"deepspeed"', "optimizer.momentum": 0.9}


def _backbone_file(run_dir, step):
    path = run_dir / "checkpoints" / f"step_{step:09d}" / "backbone.pt"
    return torch.load(path, weights_only=True)


def _by_name(opt_state: dict) -> dict:
    if opt_state.get("layout") == "by_parameter_name":
        return opt_state["state"]
    raise AssertionError(f"expected the by-name layout, got keys {sorted(opt_state)}")


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_resume_is_exact(data_dir, tmp_path, monkeypatch, stage):
    pytest.importorskip("deepspeed")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    sets = {**SYNTH, "run.max_steps": 6, "checkpoint.every_steps": 3, "distributed.zero_stage": stage}
    util.run_torchrun(2, util.base_overrides(data_dir, tmp_path, "straight", **sets), timeout=600)
    straight = tmp_path / "straight"
    saved = _backbone_file(straight, 3)["optimizer"]
    state = _by_name(saved)
    names = {n for g in saved["param_groups"] for n in g["params"]}
    assert set(state) == names and all("momentum_buffer" in s for s in state.values())
    assert any(bool(s["momentum_buffer"].abs().sum() > 0) for s in state.values())

    ckpt = straight / "checkpoints" / "step_000000003"
    util.run_torchrun(2, util.base_overrides(data_dir, tmp_path, "resumed", **{
        **sets, "checkpoint.resume": f'"{ckpt}"'}), timeout=600)
    a, b = util.final_weights(straight), util.final_weights(tmp_path / "resumed")
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"resumed run differs in {diff[:5]}"
    sa, sb = _by_name(_backbone_file(straight, 6)["optimizer"]), _by_name(_backbone_file(tmp_path / "resumed", 6)["optimizer"])
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[n]["momentum_buffer"], sb[n]["momentum_buffer"]) for n in sa)

    if stage == 2:
        # Another world size: the 2-rank ZeRO-2 state loads on 1 rank (ZeRO-1 there) unchanged;
        # with no step left to run, the job's own checkpoint re-gathers exactly what it loaded.
        util.run_torchrun(1, util.base_overrides(data_dir, tmp_path, "one", **{
            **sets, "run.max_steps": 3, "distributed.zero_stage": 1, "checkpoint.resume": f'"{ckpt}"'}),
            timeout=600)
        again = _by_name(_backbone_file(tmp_path / "one", 3)["optimizer"])
        assert again.keys() == state.keys()
        assert all(torch.equal(again[n]["momentum_buffer"], state[n]["momentum_buffer"]) for n in state)


def test_ddp_checkpoint_continues_under_zero_and_back(data_dir, tmp_path, monkeypatch):
    """The torch layout of a DDP run loads into ZeRO-2 by parameter position, and ZeRO's by-name
    state loads into DDP: the momentum survives both ways."""
    pytest.importorskip("deepspeed")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    sets = {**SYNTH, "run.max_steps": 2, "checkpoint.every_steps": 0}
    ddp = {k: v for k, v in sets.items() if not k.startswith("distributed.")}
    util.run_torchrun(2, util.base_overrides(data_dir, tmp_path, "ddp", **ddp))
    ckpt = tmp_path / "ddp" / "checkpoints" / "step_000000002"
    util.run_torchrun(2, util.base_overrides(data_dir, tmp_path, "zero", **{
        **sets, "distributed.zero_stage": 2, "checkpoint.resume": f'"{ckpt}"'}), timeout=600)
    torch_sd = _backbone_file(tmp_path / "ddp", 2)["optimizer"]
    by_name = _by_name(_backbone_file(tmp_path / "zero", 2)["optimizer"])
    positions = [i for g in torch_sd["param_groups"] for i in g["params"]]
    names = [n for g in _backbone_file(tmp_path / "zero", 2)["optimizer"]["param_groups"] for n in g["params"]]
    assert len(positions) == len(names)
    for i, n in zip(positions, names):
        assert torch.equal(torch_sd["state"][i]["momentum_buffer"], by_name[n]["momentum_buffer"]), n
    zckpt = tmp_path / "zero" / "checkpoints" / "step_000000002"
    util.run_torchrun(1, util.base_overrides(data_dir, tmp_path, "back", **{**ddp, "checkpoint.resume": f'"{zckpt}"'}))
    back = _backbone_file(tmp_path / "back", 2)["optimizer"]
    for i, n in zip(positions, names):
        assert torch.equal(back["state"][i]["momentum_buffer"], by_name[n]["momentum_buffer"]), n

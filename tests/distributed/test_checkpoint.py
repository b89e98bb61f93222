"""Checkpoints across world sizes: exact round trip on the saving world size, and resharding
(save on N ranks, load on M) of W, the cluster bank and the head optimizer state, with training
continuing to the same losses as on the original world size.

The head is exact across world sizes at ``sample_rate=1`` (see test_head_parity), so after loading on
M ranks the next steps must give the losses the saving job got on N ranks.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from partial_fc import PartialFCHead
from tests.harness import run_distributed

NUM_CLASSES = 11
DIM = 8
IN_DIM = 6
GLOBAL_BATCH = 12  # divisible by 1, 2, 3 and 4
TRAIN_STEPS = 3
CONTINUE_STEPS = 2
HEAD = dict(num_classes=NUM_CLASSES, embedding_size=DIM, method="s6", temperature="learnable",
            phi_percentiles=(0.0, 100.0), s=16.0, seed=3, sample_rate=1.0)
BANK_KEYS = ("centers", "counts", "mean_dist", "dist_obs", "class_counts")
TOL = dict(rtol=1e-5, atol=1e-6)


def _objects(opt_kind: str, backbone_seed: int, perturb: bool):
    from torch.nn.parallel import DistributedDataParallel as DDP

    head = PartialFCHead(**HEAD)
    if perturb:  # a fresh job must not pass because the load did nothing
        with torch.no_grad():
            head.weight.mul_(-3.0)
    torch.manual_seed(backbone_seed)
    backbone = DDP(nn.Sequential(nn.Linear(IN_DIM, 16), nn.Tanh(), nn.Linear(16, DIM)))
    if opt_kind == "sgd":
        hopt = torch.optim.SGD(head.parameters(), lr=0.5, momentum=0.9, weight_decay=5e-4)
    else:
        hopt = torch.optim.AdamW(head.parameters(), lr=0.05, weight_decay=0.01)
    bopt = torch.optim.SGD(backbone.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(bopt, step_size=2, gamma=0.5)
    return head, backbone, hopt, bopt, sched


def _batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(GLOBAL_BATCH, IN_DIM, generator=g), torch.randint(0, NUM_CLASSES, (GLOBAL_BATCH,), generator=g)


def _train(rank, world_size, head, backbone, hopt, bopt, sched, steps) -> list[float]:
    per = GLOBAL_BATCH // world_size
    losses = []
    for step in steps:
        x, y = _batch(step)
        sl = slice(rank * per, (rank + 1) * per)
        out = head(backbone(x[sl]), y[sl])
        out["loss"].backward()
        hopt.step()
        bopt.step()
        sched.step()
        hopt.zero_grad()
        bopt.zero_grad()
        losses.append(float(out["loss"].detach()))
    return losses


def _clone(obj):
    if torch.is_tensor(obj):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(v) for v in obj)
    return obj


def _snapshot(head, backbone, hopt, bopt, sched) -> dict:
    names = {id(p): n for n, p in head.named_parameters()}
    opt_state = {names[id(p)]: _clone(dict(s)) for p, s in hopt.state.items()}
    return dict(
        start=head.class_start,
        weight=head.weight.detach().clone(),
        bank={k: getattr(head.bank, k).clone() for k in BANK_KEYS},
        opt=opt_state,
        log_tau=head.log_tau.detach().clone(),
        step=head.step.clone(),
        backbone={k: v.clone() for k, v in backbone.module.state_dict().items()},
        bopt=_clone(bopt.state_dict()),
        sched=sched.state_dict(),
        lr=[g["lr"] for g in hopt.param_groups],
    )


def _save_worker(rank: int, world_size: int, root: str, opt_kind: str) -> dict:
    from train.checkpoint import save_checkpoint

    head, backbone, hopt, bopt, sched = _objects(opt_kind, backbone_seed=0, perturb=False)
    _train(rank, world_size, head, backbone, hopt, bopt, sched, range(TRAIN_STEPS))
    path = save_checkpoint(root, TRAIN_STEPS, head, hopt, backbone=backbone, backbone_optimizer=bopt,
                           lr_scheduler=sched, extra_state={"epoch": 1, "data_position": torch.tensor([7, 3])})
    snap = _snapshot(head, backbone, hopt, bopt, sched)
    snap["path"] = str(path)
    snap["rand"] = torch.rand(3)
    snap["losses"] = _train(rank, world_size, head, backbone, hopt, bopt, sched,
                            range(TRAIN_STEPS, TRAIN_STEPS + CONTINUE_STEPS))
    return snap


def _load_worker(rank: int, world_size: int, root: str, opt_kind: str) -> dict:
    from train.checkpoint import find_latest, load_checkpoint

    head, backbone, hopt, bopt, sched = _objects(opt_kind, backbone_seed=1, perturb=True)
    path = find_latest(root)
    extra = load_checkpoint(path, head, hopt, backbone=backbone, backbone_optimizer=bopt, lr_scheduler=sched)
    snap = _snapshot(head, backbone, hopt, bopt, sched)
    snap["path"] = str(path)
    snap["extra"] = extra
    snap["rand"] = torch.rand(3)
    snap["losses"] = _train(rank, world_size, head, backbone, hopt, bopt, sched,
                            range(TRAIN_STEPS, TRAIN_STEPS + CONTINUE_STEPS))
    return snap


def _dense(results: list[dict]) -> dict:
    """Concatenates the per-rank shards (rank order = class order) into full tensors."""
    results = sorted(results, key=lambda r: r["start"])
    out = {"weight": torch.cat([r["weight"] for r in results])}
    for k in BANK_KEYS:
        out[k] = torch.cat([r["bank"][k] for r in results])
    for k, v in results[0]["opt"]["weight"].items():
        out[f"opt.{k}"] = torch.cat([r["opt"]["weight"][k] for r in results]) if v.dim() else v
    return out


def _assert_equal(got, want, msg: str) -> None:
    if torch.is_tensor(want):
        assert torch.equal(got, want), msg
    elif isinstance(want, dict):
        assert got.keys() == want.keys(), msg
        for k in want:
            _assert_equal(got[k], want[k], f"{msg}.{k}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), msg
        for i, (a, b) in enumerate(zip(got, want)):
            _assert_equal(a, b, f"{msg}[{i}]")
    else:
        assert got == want, msg


def _check(saved: list[dict], loaded: list[dict], same_world: bool) -> None:
    dense_saved, dense_loaded = _dense(saved), _dense(loaded)
    assert dense_saved.keys() == dense_loaded.keys()
    for key in dense_saved:
        _assert_equal(dense_loaded[key], dense_saved[key], key)
    ref = saved[0]
    for rank, r in enumerate(loaded):
        msg = f"rank {rank}/{len(loaded)}"
        for key in ("log_tau", "step", "backbone", "bopt", "sched", "lr"):
            _assert_equal(r[key], ref[key], f"{msg} {key}")
        _assert_equal(r["opt"]["log_tau"], ref["opt"]["log_tau"], f"{msg} opt.log_tau")
        _assert_equal(r["extra"], {"epoch": 1, "data_position": torch.tensor([7, 3])}, f"{msg} extra")
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(ref["losses"]), **TOL,
                                   msg=f"{msg}: continued training diverges from the saving world size")
        if same_world:
            assert torch.equal(r["rand"], saved[rank]["rand"]), f"{msg}: RNG state not restored"
    if not same_world and len(loaded) > 1:
        assert not torch.equal(loaded[0]["rand"], loaded[1]["rand"]), "reseeded ranks must differ"


@pytest.fixture(scope="module")
def saved_on_2(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt2")
    root = tmp / "ckpts"
    saved = run_distributed(_save_worker, 2, tmp, timeout=90, root=str(root), opt_kind="sgd")
    return tmp, root, saved


def test_layout_is_one_logical_checkpoint(saved_on_2):
    import json

    _, root, saved = saved_on_2
    path = root / "step_000000003"
    assert saved[0]["path"] == saved[1]["path"] == str(path)
    assert (root / "latest").read_text().strip() == "step_000000003"
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["num_classes"] == NUM_CLASSES and manifest["step"] == 3
    assert [(s["start"], s["end"]) for s in manifest["shards"]] == [(0, 6), (6, 11)]
    assert sorted(p.name for p in path.iterdir()) == sorted([
        "manifest.json", "backbone.pt", "head_replicated.pt", "rng_rank0.pt", "rng_rank1.pt",
        "head_classes_000000000_000000006.pt", "head_classes_000000006_000000011.pt"])
    assert set(manifest["files"]) == {p.name for p in path.iterdir()} - {"manifest.json"}


@pytest.mark.parametrize("load_world", [2, 1, 3])
def test_save_on_2_load_on_m(saved_on_2, load_world):
    tmp, root, saved = saved_on_2
    loaded = run_distributed(_load_worker, load_world, tmp, timeout=90, root=str(root), opt_kind="sgd")
    assert "opt.momentum_buffer" in _dense(loaded)
    _check(saved, loaded, same_world=load_world == 2)


def test_save_on_4_load_on_2_adamw(tmp_path):
    root = tmp_path / "ckpts"
    saved = run_distributed(_save_worker, 4, tmp_path, timeout=120, root=str(root), opt_kind="adamw")
    loaded = run_distributed(_load_worker, 2, tmp_path, timeout=90, root=str(root), opt_kind="adamw")
    dense = _dense(loaded)
    assert {"opt.exp_avg", "opt.exp_avg_sq", "opt.step"} <= dense.keys()
    assert int(dense["opt.step"]) == TRAIN_STEPS
    _check(saved, loaded, same_world=False)


# --- every rank raises together on a bad checkpoint (no rank left hanging in a collective) ---------
def _corrupt_load_worker(rank: int, world_size: int, root: str) -> str:
    from train.checkpoint import CheckpointError, load_checkpoint

    head, backbone, hopt, bopt, sched = _objects("sgd", backbone_seed=1, perturb=True)
    try:
        load_checkpoint(f"{root}/step_000000003", head, hopt, backbone=backbone)
    except CheckpointError as e:
        return str(e)
    return "no error"


def test_corrupted_shard_fails_on_every_rank(saved_on_2, tmp_path):
    import shutil

    _, root, _ = saved_on_2
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    shard = copy / "step_000000003" / "head_classes_000000006_000000011.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    msgs = run_distributed(_corrupt_load_worker, 2, tmp_path, timeout=90, root=str(copy))
    for msg in msgs:  # only rank 1 reads that shard; rank 0 must not return normally
        assert "rank 1" in msg and "sha256" in msg, msg


def _check_worker(rank: int, world_size: int, root: str) -> dict:
    from train.checkpoint import CheckpointError, check_checkpoint, list_checkpoints

    head, backbone, hopt, bopt, sched = _objects("sgd", backbone_seed=1, perturb=True)
    before = head.weight.detach().clone()
    out = {}
    for path in list_checkpoints(root):  # what the trainer's auto-resume does, newest first
        try:
            check_checkpoint(path, head, hopt, backbone=backbone)
            out["chosen"] = path.name
            break
        except CheckpointError as e:
            out.setdefault("rejected", []).append(str(e))
    out["unchanged"] = bool(torch.equal(before, head.weight.detach()))
    return out


def test_check_checkpoint_agrees_on_every_rank_and_falls_back(saved_on_2, tmp_path):
    """The newest checkpoint's second shard (read by rank 1 only) is corrupt: both ranks reject
    it together and both choose the previous one, without loading anything."""
    import shutil

    _, root, _ = saved_on_2
    copy = tmp_path / "copy"
    shutil.copytree(root / "step_000000003", copy / "step_000000002")
    shutil.copytree(root / "step_000000003", copy / "step_000000003")
    shard = copy / "step_000000003" / "head_classes_000000006_000000011.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    outs = run_distributed(_check_worker, 2, tmp_path, timeout=90, root=str(copy))
    for out in outs:
        assert out["chosen"] == "step_000000002" and out["unchanged"], out
        assert len(out["rejected"]) == 1 and "rank 1" in out["rejected"][0] and "sha256" in out["rejected"][0]

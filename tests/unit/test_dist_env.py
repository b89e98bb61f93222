"""Launcher environment -> rank mapping (torchrun, Slurm srun tasks, sbatch batch shell), checked
against a Slurm environment recorded on a real (localhost) Slurm 22.05 cluster."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from train.dist_env import DistEnv, expand_slurm_nodelist, first_slurm_host, read_launch_env

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "slurm_env_2tasks.json"


@pytest.fixture(scope="module")
def recorded() -> dict:
    return json.loads(FIXTURE.read_text())


@pytest.mark.parametrize("nodelist, hosts", [
    ("vm", ["vm"]),
    ("gpu[01-02,05],cpu7", ["gpu01", "gpu02", "gpu05", "cpu7"]),
    ("cpu7,gpu[01-02]", ["cpu7", "gpu01", "gpu02"]),
    ("a[1-2],b[09-11]", ["a1", "a2", "b09", "b10", "b11"]),
    ("rack[1-2]-n[08-09]", ["rack1-n08", "rack1-n09", "rack2-n08", "rack2-n09"]),
    ("node[7]", ["node7"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
])
def test_expand_slurm_nodelist(nodelist, hosts):
    assert expand_slurm_nodelist(nodelist) == hosts
    assert first_slurm_host(nodelist) == hosts[0]


@pytest.mark.parametrize("bad", ["", "  ", "a[1-2", "a]1", "a[[1]]", "a[]", "a[3-1]", "a[x]", "a,,b", "a[1-]"])
def test_expand_slurm_nodelist_rejects_malformed(bad):
    with pytest.raises(ValueError, match="Slurm node list"):
        expand_slurm_nodelist(bad)


def test_recorded_srun_tasks_map_to_ranks(recorded):
    tasks = recorded["tasks"]
    got = [read_launch_env(t) for t in tasks]
    assert [(d.rank, d.local_rank, d.world_size, d.source) for d in got] == [(0, 0, 2, "slurm"), (1, 1, 2, "slurm")]
    # Both tasks agree on the rendezvous: the step's first node and a port derived from the job id.
    assert {(d.master_addr, d.master_port) for d in got} == {("vm", 10000 + int(tasks[0]["SLURM_JOB_ID"]))}


def test_recorded_batch_shell_is_a_single_process(recorded):
    batch = recorded["batch"]
    # The batch shell looks like rank 0 of 2 by SLURM_PROCID/SLURM_NTASKS alone ...
    assert batch["SLURM_PROCID"] == "0" and batch["SLURM_NTASKS"] == "2"
    assert "SLURM_STEP_ID" not in batch
    # ... but it is no job step: a trainer started there runs alone instead of waiting for rank 1.
    assert read_launch_env(batch) == DistEnv()


def test_torchrun_variables_win_over_slurm(recorded):
    env = dict(recorded["tasks"][1], RANK="5", LOCAL_RANK="1", WORLD_SIZE="8", MASTER_ADDR="h", MASTER_PORT="29400")
    assert read_launch_env(env) == DistEnv(5, 1, 8, "h", 29400, "torchrun")


def test_step_counts_and_master_overrides(recorded):
    env = dict(recorded["tasks"][0], SLURM_STEP_NUM_TASKS="4", SLURM_NTASKS="8",
               SLURM_STEP_NODELIST="gpu[03-04]", SLURM_JOB_NODELIST="gpu[01-04]")
    d = read_launch_env(env)
    # The step (not the whole allocation) is the world; its first node hosts task 0.
    assert (d.world_size, d.master_addr) == (4, "gpu03")
    d = read_launch_env(dict(env, MASTER_ADDR="10.0.0.1", MASTER_PORT="1234"))
    assert (d.master_addr, d.master_port) == ("10.0.0.1", 1234)
    # One task in the step: a world of one.
    assert read_launch_env(dict(env, SLURM_STEP_NUM_TASKS="1")) == DistEnv()


def test_no_launcher_is_a_single_process():
    assert read_launch_env({}) == DistEnv()


@pytest.mark.parametrize("env, match", [
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "rank 2 outside world size 2"),
    ({"SLURM_PROCID": "3", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "a"}, "rank 3 outside"),
    ({"SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "a[1-"}, "node list"),
])
def test_bad_environment_is_a_clear_error(env, match):
    with pytest.raises(ValueError, match=match):
        read_launch_env(env)

"""Static checks of docker/ (no Docker engine or cluster on the development machines): the files
parse, the image installs the extras and versions setup.py defines, runs as a non-root user with
the `pfc` entry point, and the compose/Kubernetes manifests agree with the launch script and the
config (their overrides load as a real config)."""

from __future__ import annotations

import ast
import fnmatch
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml  # the dev extra pins pyyaml

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"


# ------------------------------------------------------------------------------ helpers
def _setup_py() -> dict:
    """EXTRAS and the console scripts of setup.py, read with ast (setup() is never run)."""
    tree = ast.parse((REPO / "setup.py").read_text())
    extras = scripts = None
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "EXTRAS" for t in node.targets):
            extras = ast.literal_eval(node.value)
        if isinstance(node, ast.keyword) and node.arg == "entry_points":
            scripts = ast.literal_eval(node.value)["console_scripts"]
    assert extras and scripts, "setup.py must define EXTRAS and console_scripts"
    return {"extras": extras, "scripts": scripts}


def _pins(requirements) -> dict[str, str]:
    out = {}
    for r in requirements:
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([0-9A-Za-z.+\-]+)", r)
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for line in (DOCKER / "Dockerfile").read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):
            continue
        buf += line.rstrip()
        if buf.endswith("\\"):
            buf = buf[:-1] + " "
            continue
        instr, _, args = buf.strip().partition(" ")
        out.append((instr.upper(), args.strip()))
        buf = ""
    assert not buf, "Dockerfile ends inside a continued line"
    return out


def _args(instructions) -> dict[str, str]:
    return dict(a.split("=", 1) for i, a in instructions if i == "ARG" and "=" in a)


def _pip_installs(instructions) -> list[list[str]]:
    """The argument lists of every `pip install` in RUN instructions (ARG defaults substituted)."""
    args = _args(instructions)
    out = []
    for instr, text in instructions:
        if instr != "RUN":
            continue
        for cmd in re.split(r"&&|;", text):
            words = shlex.split(cmd)
            if words[:2] == ["pip", "install"] or words[1:3] == ["-m", "pip"]:
                words = [re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), w) for w in words]
                out.append(words[2:] if words[0] == "pip" else words[4:])
    return out


def _makefile_torch_pin() -> str:
    m = re.search(r"pip install -q torch==([0-9.]+)", (REPO / "Makefile").read_text())
    assert m, "the Makefile pins torch"
    return m.group(1)


# ------------------------------------------------------------------------------ Dockerfile
def test_dockerfile_base_user_and_entrypoint():
    ins = _dockerfile()
    base = [a for i, a in ins if i == "FROM"]
    assert len(base) == 1
    image = _args(ins).get("CUDA_IMAGE") if base[0] == "${CUDA_IMAGE}" else base[0]
    assert re.fullmatch(r"nvidia/cuda:13\.0\.\d+-(cudnn-)?runtime-ubuntu\d+\.\d+", image), image
    users = [a for i, a in ins if i == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must end as a non-root user"
    assert any(i == "RUN" and "useradd" in a and users[-1] in a.split() for i, a in ins), "the user is created"
    entry = [json.loads(a) for i, a in ins if i == "ENTRYPOINT"]
    assert entry == [["pfc"]]
    assert "pfc=train.cli:main" in _setup_py()["scripts"], "the entry point is the console script setup.py defines"
    # Instructions come after the FROM they belong to, and the user is set after installing.
    names = [i for i, _ in ins]
    assert names.index("USER") > max(k for k, n in enumerate(names) if n == "RUN")


def test_dockerfile_installs_the_pinned_extras():
    setup = _setup_py()
    extras = setup["extras"]
    pins = _pins(r for reqs in extras.values() for r in reqs)
    installs = _pip_installs(_dockerfile())
    assert installs, "no pip install found"
    requested: set[str] = set()
    for words in installs:
        for w in words:
            m = re.fullmatch(r"/opt/pfc\[([a-z0-9_,]+)\]", w)
            if m:
                requested |= set(m.group(1).split(","))
            m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==(\S+)", w)
            if m:
                name, version = m.group(1).lower(), m.group(2)
                want = _makefile_torch_pin() if name == "torch" else pins.get(name)
                assert want is not None, f"{name} is pinned in the Dockerfile but not in setup.py or the Makefile"
                assert version == want, f"Dockerfile installs {name}=={version}, setup.py/Makefile pin {want}"
    assert requested <= set(extras), f"extras {requested - set(extras)} are not defined in setup.py"
    assert {"dali", "deepspeed", "onnx"} <= requested, requested
    # DeepSpeed needs the already-installed torch (setup.py's note): no build isolation.
    assert any("--no-build-isolation" in w and any("deepspeed" in x for x in w) for w in installs)
    # torch is installed before the project, from the CUDA index matching the DALI build.
    torch_idx = next(k for k, w in enumerate(installs) if any(x.startswith("torch==") for x in w))
    proj_idx = next(k for k, w in enumerate(installs) if any(x.startswith("/opt/pfc[") for x in w))
    assert torch_idx < proj_idx
    cuda = re.search(r"cuda(\d+)", next(r for r in extras["dali"] if "dali" in r)).group(1)
    assert any(x.endswith(f"/whl/cu{cuda}") for x in installs[torch_idx]), installs[torch_idx]


def test_dockerfile_copies_what_the_package_needs_and_dockerignore_keeps_it():
    ins = _dockerfile()
    copied = {Path(p).parts[0] for i, a in ins if i == "COPY" for p in a.split()[:-1]}
    assert {"setup.py", "partial_fc", "dali_pipelines", "train", "launch"} <= copied
    patterns = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]

    def ignored(path: str) -> bool:
        return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path, p.removeprefix("**/"))
                   or path.startswith(p.rstrip("/") + "/") for p in patterns)

    for needed in ["setup.py", "README.md", "train/cli/__init__.py", "train/recipes/cpu_demo.toml", "partial_fc/head.py",
                   "dali_pipelines/dali.py", "launch/torchrun.sh", "launch/lib.sh", "launch/slurm/train.sbatch"]:
        assert (REPO / needed).is_file() and not ignored(needed), needed
    for junk in [".venv/bin/python", ".git/HEAD", "runs/x/checkpoints/a.pt", "data/synth/train.rec",
                 "train/__pycache__/cli.cpython-311.pyc"]:
        assert ignored(junk), junk


# ------------------------------------------------------------------------------ manifests
def _overrides_load(recipe: str, args: list[str]) -> None:
    """The manifest's KEY=VALUE arguments are valid overrides of its recipe (unknown keys fail)."""
    from train.config import load_config

    assert all("=" in a and not a.startswith("-") for a in args), args
    load_config(recipe, args)


def test_compose_file():
    doc = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    svc = doc["services"]["train"]
    assert (DOCKER / svc["build"]["context"] / svc["build"]["dockerfile"]).resolve() == (DOCKER / "Dockerfile")
    assert svc["entrypoint"] == ["/opt/pfc/launch/torchrun.sh"]
    env = svc["environment"]
    assert env["NNODES"] == "1" and env["NPROC_PER_NODE"] == "gpu"
    recipe = re.fullmatch(r"\$\{RECIPE:-(\w+)\}", env["RECIPE"]).group(1)
    _overrides_load(recipe, svc["command"])
    gpus = svc["deploy"]["resources"]["reservations"]["devices"]
    assert gpus == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert re.fullmatch(r"\d+[gm]b", svc["shm_size"])
    targets = {v["target"]: v for v in svc["volumes"]}
    assert targets["/workspace/data"]["read_only"] is True and not targets["/workspace/runs"].get("read_only")
    # The recipe's relative data and run paths land in those volumes (image WORKDIR /workspace).
    assert ("WORKDIR", "/workspace") in _dockerfile()
    from train.config import load_config

    cfg = load_config(recipe)
    assert cfg.data.train_rec.startswith("data/") and cfg.run.output_dir == "runs"
    assert svc["stop_signal"] == "SIGTERM"


def test_kubernetes_indexed_job_with_headless_service_and_shared_storage():
    docs = list(yaml.safe_load_all((DOCKER / "k8s" / "train.yaml").read_text()))
    by_kind: dict[str, list] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    (svc,), (job,) = by_kind["Service"], by_kind["Job"]
    pvcs = {p["metadata"]["name"]: p for p in by_kind["PersistentVolumeClaim"]}
    spec = job["spec"]
    pod = spec["template"]["spec"]
    (c,) = pod["containers"]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}

    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == int(env["NNODES"])
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) == int(env["NPROC_PER_NODE"])
    assert pod["restartPolicy"] == "Never"
    # Headless Service whose selector matches the pods; pod 0's DNS name is the rendezvous host.
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    labels = spec["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    assert pod["subdomain"] == svc["metadata"]["name"]
    host, port = env["RDZV_ENDPOINT"].rsplit(":", 1)
    assert host == f"{job['metadata']['name']}-0.{svc['metadata']['name']}"
    assert int(port) in {p["port"] for p in svc["spec"]["ports"]}
    assert env["NODE_RANK"]["fieldRef"]["fieldPath"].endswith("['batch.kubernetes.io/job-completion-index']")
    # Preemption: exit 75 (checkpoint written) is not a failure.
    rules = spec["podFailurePolicy"]["rules"]
    assert any(r["action"] == "Ignore" and 75 in r.get("onExitCodes", {}).get("values", []) for r in rules)
    assert c["command"] == ["/opt/pfc/launch/torchrun.sh"]
    _overrides_load(env["RECIPE"], c["args"])
    # Shared storage is explicit: checkpoints on a ReadWriteMany claim, data read-only.
    vols = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    runs_claim = vols[mounts["/workspace/runs"]["name"]]["persistentVolumeClaim"]["claimName"]
    data_claim = vols[mounts["/workspace/data"]["name"]]["persistentVolumeClaim"]["claimName"]
    assert pvcs[runs_claim]["spec"]["accessModes"] == ["ReadWriteMany"]
    assert "ReadOnlyMany" in pvcs[data_claim]["spec"]["accessModes"] and mounts["/workspace/data"]["readOnly"]
    assert vols[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"
    # The pod runs as the image's non-root user.
    uid = pod["securityContext"]["runAsUser"]
    assert pod["securityContext"]["runAsNonRoot"] is True and str(uid) == _args(_dockerfile())["PFC_UID"]

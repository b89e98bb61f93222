"""The design card's layer rules, checked on the source: partial_fc and dali_pipelines never import
train; partial_fc never imports DALI; importing a package has no side effects on torch.distributed."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _imports(package: str) -> set[str]:
    names = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
    return names


@pytest.mark.parametrize("package", ["partial_fc", "dali_pipelines"])
def test_lower_layers_never_import_train(package):
    assert not any(n == "train" or n.startswith("train.") for n in _imports(package))


def test_partial_fc_never_imports_dali():
    bad = {n for n in _imports("partial_fc") if "dali" in n}
    assert not bad, bad


def test_partial_fc_never_calls_cuda():
    for path in (ROOT / "partial_fc").rglob("*.py"):
        assert ".cuda()" not in path.read_text(), path


def test_import_has_no_side_effects():
    code = (
        "import torch.distributed as d, partial_fc, dali_pipelines, train;"
        "assert not d.is_initialized(); print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr

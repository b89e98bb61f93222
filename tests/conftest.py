"""Suite-wide hooks: tests marked ``gpu`` skip on a machine without CUDA."""

import pytest


def pytest_collection_modifyitems(config, items):
    gpu = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (marked gpu; benchmarks/gpu_check.sh runs these on a GPU)")
    for item in gpu:
        item.add_marker(skip)

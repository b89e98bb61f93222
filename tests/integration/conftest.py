"""Fixtures shared by the integration tests."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A tiny synthetic identity dataset (32 training identities), made once per test session."""
    from dali_pipelines.synth_faces import SynthConfig, generate_synthetic_dataset

    out = tmp_path_factory.mktemp("synth")
    generate_synthetic_dataset(out, SynthConfig(
        train_identities=32, images_per_identity=12, ver_identities=20, ver_images_per_identity=4,
        ver_pairs=200, cluster_identities=0, seed=3), workers=1, progress=False)
    return out

"""Packaging for partial-fc: one distribution, three packages, optional extras.

torch is deliberately a range here, not a pin: GPU clusters bring their own CUDA build. The
Makefile installs the CPU build (torch==2.13.0) first so that the range is already satisfied
and pip never pulls the multi-gigabyte CUDA wheels on a CPU machine.
"""

from setuptools import find_packages, setup

EXTRAS = {
    "dali": ["nvidia-dali-cuda130==2.4.0"],
    # deepspeed must be installed with --no-build-isolation after torch (see Makefile).
    "deepspeed": ["deepspeed==0.19.8"],
    "onnx": ["onnx==1.23.2", "onnxruntime==1.31.1", "onnxscript==0.7.2"],
    # opencv: the face-alignment warp (dali_pipelines.align); scikit-image: the tests' independent
    # reference for it. opencv 4.13 is the first that accepts numpy >= 2.3.
    "eval": ["scikit-learn==1.9.1", "matplotlib==3.11.2", "opencv-python-headless==4.13.0.92",
             "scikit-image==0.26.0"],
    "tensorboard": ["tensorboard==2.21.0"],
    "dev": ["pytest==9.2.0", "pytest-timeout==2.4.0", "pyyaml==6.0.4"],
}

setup(
    name="partial-fc",
    version="0.1.0",
    description=(
        "Distributed Partial FC training for face recognition at millions of identities, "
        "with cluster-guided margins and supervised cluster contrastive learning."
    ),
    python_requires=">=3.10",
    packages=find_packages(include=["partial_fc*", "dali_pipelines*", "train*"]),
    package_data={"train": ["recipes/*.toml", "config/docs_template.md"]},
    install_requires=[
        "torch>=2.4",
        "numpy>=1.24",
        "pillow>=10",
        "tqdm>=4.60",
        "prometheus-client>=0.20",
        # Fast JPEG decode for the fallback loader and the evaluation runner (wheels for
        # manylinux x86_64/aarch64; no system libjpeg needed).
        "simplejpeg==1.9.0",
        # Writes the resolved config.toml of a run (python 3.11's tomllib only reads).
        "tomli-w==1.2.0",
    ],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["pfc=train.cli:main"]},
)

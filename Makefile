# Bootstrap: `make demo` and `make test` are the README's two quickstart commands. Each creates
# .venv on first use and installs the project with the extras the tests need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# The real-Slurm test (tests/integration/test_launch.py) may install Debian's slurm-wlm with
# apt-get when it runs as root (about 10 s); without root or apt it is skipped with the reason.
# PFC_SLURM_TESTS=off skips it, =require makes a missing Slurm a failure. See docs/launch.md.
export PFC_SLURM_INSTALL ?= 1
# DeepSpeed compiles a small CPU op on first use (~50 s); keep it with the venv.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

.PHONY: demo test install clean

install: $(STAMP)

# The CPU torch wheel goes in first so that the project's `torch>=2.4` is already satisfied and
# pip never downloads CUDA wheels on a CPU machine.
$(STAMP): setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,dali,onnx,eval]'
	# DeepSpeed builds against the torch already installed, hence no build isolation.
	$(PY) -m pip install -q --no-build-isolation 'deepspeed==0.19.8'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m train demo

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache

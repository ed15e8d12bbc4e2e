# Two commands do everything on a fresh machine (README.md):
#   make demo   - install, pretrain SimCLR briefly on the embedded cifar10-mini, kNN-evaluate it vs random init
#   make test   - install, run the test suite (what CI runs)
# and:
#   make test-convergence - the fifteen methods' short CPU pretraining runs, each scored by kNN against random init
#   make test-fast        - make test without the multi-process (torchrun) tests, while editing
#   make gpu-check        - on a GPU machine: build, CUDA tests, ops/throughput benchmarks, a short SimCLR run (JSON)
#   make bench-peers     - install the peer libraries the benchmarks compare against (bench/peers.txt; network)
#   make peer-wheels     - download them as wheels to .whl/, for make gpu-check on a machine without network
#   make fashion-mnist   - install Debian's dataset-fashion-mnist (as root), for the tests that use it
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PY := $(VENV)/bin/python

.PHONY: install test test-convergence test-fast demo gpu-check bench-peers peer-wheels fashion-mnist clean

$(VENV)/.installed: setup.py pyproject.toml requirements-dev.txt $(wildcard csrc/*)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q setuptools wheel
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $@

install: $(VENV)/.installed

# two pytest workers (pytest-xdist): most tests wait on a subprocess importing torch, so two share 2 cores well;
# --dist loadfile sends each file to one worker, and tests/conftest.py runs every script on one thread under
# xdist (no OpenMP oversubscription). The convergence runs are ResNet-18 pretraining: 30-90 minutes on 2 cores,
# so they have their own target (two files of similar length, one per worker).
test: install
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not convergence" tests

test-convergence: install
	$(PY) -m pytest -q -n 2 --dist loadfile -m convergence tests

test-fast: install
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not convergence and not distributed" tests

demo: install
	$(PY) demo.py

# on a machine with one GPU and no network, with the Python that has torch there (GPU_PYTHON): build the ops for
# that GPU, the CUDA tests, bench/ops.py and bench/throughput.py on CUDA, a short SimCLR run; one JSON in bench/results/
GPU_PYTHON ?= python3
gpu-check:
	$(GPU_PYTHON) bench/gpu_check.py

# the benchmarks' peers (bench/peers.txt), installed into .venv; or downloaded as wheels for gpu-check to install
bench-peers: install
	$(PY) -m pip install -q -r bench/peers.txt

peer-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: -d .whl -r bench/peers.txt

# optional: Fashion-MNIST's IDX files from Debian (/usr/share/datasets/fashion-mnist); its tests skip without them
fashion-mnist:
	apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist

clean:
	rm -rf build *.egg-info common/_C*.so

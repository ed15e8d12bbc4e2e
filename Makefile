# Two commands do everything on a fresh machine (README.md):
#   make demo   - install, pretrain SimCLR briefly on the embedded cifar10-mini, kNN-evaluate it vs random init
#   make test   - install, run the test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PY := $(VENV)/bin/python

.PHONY: install test demo clean

$(VENV)/.installed: setup.py requirements-dev.txt $(wildcard csrc/*)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q setuptools wheel
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-build-isolation -e .
	@# Fashion-MNIST comes from Debian (optional: its tests skip without it)
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) || echo "note: dataset-fashion-mnist not installed"; fi
	touch $@

install: $(VENV)/.installed

# two pytest workers (pytest-xdist): most tests wait on a subprocess importing torch, so two share 2 cores well;
# --dist loadfile sends each file to one worker: the convergence runs are two files of similar length, and
# tests/conftest.py runs every script on one thread under xdist (no OpenMP oversubscription)
test: install
	$(PY) -m pytest -q -n 2 --dist loadfile tests

demo: install
	$(PY) demo.py

clean:
	rm -rf build *.egg-info common/_C*.so

# The two commands of the README: `make quickstart` (the main job) and `make test`. Both set up a fresh
# machine first: Debian's Fashion-MNIST and tcmalloc, a virtualenv with the pinned requirements, the FID
# Inception weights.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mage_jax_setup
TEST_STAMP := $(VENV)/.mage_jax_test_deps
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: setup test test-all lint quickstart reference bench wheels clean-venv

setup: $(STAMP)

$(STAMP): requirements.txt setup.py
	@if [ ! -d /usr/share/datasets/fashion-mnist ] || ! ls /usr/lib/*/libtcmalloc_minimal.so.4 >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist libtcmalloc-minimal4; \
	  else echo "note: run 'sudo apt-get install -y dataset-fashion-mnist libtcmalloc-minimal4' (Fashion-MNIST" \
	    "offline, and the allocator the binaries run fastest under; TFDS can download fashion_mnist instead)"; fi; fi
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m mage_jax.fid.weights setup || echo "note: FID Inception weights unavailable; FID will be skipped"
	touch $(STAMP)

$(TEST_STAMP): $(STAMP) requirements-test.txt
	$(PY) -m pip install -q -r requirements-test.txt -c requirements.txt
	touch $(TEST_STAMP)

# Two test processes (pytest-xdist, one per core), a test file per process: module fixtures are built once.
test: setup $(TEST_STAMP)
	MAGE_JAX_REQUIRE_FID=1 $(PY) -m pytest -q -n 2 --dist loadfile -m "not heavy" tests

test-all: setup $(TEST_STAMP)
	MAGE_JAX_REQUIRE_FID=1 $(PY) -m pytest -q -n 2 --dist loadfile tests

lint: $(TEST_STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

quickstart: setup
	$(PY) -m mage_jax.quickstart --workdir=runs/quickstart

# MAGE's quality against training minutes (about 100 minutes on 2 cores; docs/reference_run.md). Rerun to resume.
WORKDIR ?= $(HOME)/mage_runs/reference
reference: setup
	$(PY) -m mage_jax.reference --workdir=$(WORKDIR)

bench: setup
	$(PY) bench/benchmark.py --size=tiny

# Packages a GPU image without network may lack, for bench/device_suite.sh (it installs them from here when
# missing): pure-Python wheels, and wrapt (needed by clu) built for CPython 3.12 on x86-64 Linux.
WHEELS := .cache/wheels
wheels:
	$(PYTHON) -m pip download -q --no-deps -d $(WHEELS) ml-collections==1.1.0 clu==0.0.12 pytest==9.2.0 \
	  pluggy==1.7.0 iniconfig==2.3.1 packaging==26.4 pygments==2.21.0
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	  --platform manylinux2014_x86_64 -d $(WHEELS) wrapt==2.5.2

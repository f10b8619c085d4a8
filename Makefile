# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Each creates or refreshes .venv idempotently, installs what is missing, and makes sure
# Fashion-MNIST is on disk (Debian package when apt is usable, else the official download).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: setup data demo test bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@# The machine's local CPU wheel; a bare `pip install torch` would pull gigabytes of CUDA packages.
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

setup: $(STAMP)

data: setup
	@bash scripts/ensure-data.sh $(VENV)

demo: data
	$(VENV)/bin/randteach demo

# Two test processes (pytest-xdist) of one thread each: the tests use tiny models, where threads cost
# more than they give, and a single process left the second core mostly idle (on the 2-core AMD VM of
# 2026-12-02: 5 min 14 s instead of 6 min 33 s to 9 min 10 s).
test: data
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2

bench: data
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) runs .pytest_cache

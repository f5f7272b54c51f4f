# Two commands: `make demo` and `make test`. Both create .venv when it is missing and
# install the project into it; both are idempotent.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SPECS := specs/small_fc_lopt.yaml specs/velo.yaml specs/adam.yaml specs/elo.yaml specs/mulo.yaml specs/celo2.yaml specs/elo_celo2.yaml

.PHONY: setup test demo bench generate check clean

setup: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# The CPU build of torch goes in first where no torch is importable: a bare `torch`
# requirement would otherwise pull a CUDA build of several GB.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# Two workers: most of a run is compiling kernels, one core each (the build cache shares them).
test: setup
	$(PY) -m pytest -q -n 2

demo: setup
	$(VENV)/bin/lopt-compile $(SPECS)
	$(PY) benchmarks/demo.py

bench: setup
	$(PY) -c "import matplotlib" 2>/dev/null || $(PY) -m pip install --quiet matplotlib
	$(PY) benchmarks/step_time.py --no-compile

generate: setup
	$(VENV)/bin/lopt-compile $(SPECS)

check: setup
	$(VENV)/bin/lopt-compile --check $(SPECS)

clean:
	rm -rf $(VENV) build *.egg-info

# Two commands set up a fresh machine (see README.md):
#   make reproduce   -> builds .venv, runs `libnet reproduce mnist` on the embedded default data
#   make test        -> builds .venv, runs ruff, then tests/, integration_tests/ and the docstring examples, then
#                       builds the documentation site with `mkdocs build --strict` (into site/, ignored by git)
#   make docs        -> serves the documentation site locally (mkdocs serve)
# .venv installs the lock (requirements/constraints.txt); the package itself asks only for ranges (pyproject.toml).
#   make test-kernels -> the suite on the lock with another CPU's kernel paths (AVX2, generic), 1 thread
#   make test-compat -> the compatibility run (not part of CI: it downloads a few GB once): .venv-compat on
#                       Python 3.12 with the registry's torch, torchvision and timm, the project installed with
#                       plain pip (no lock), the suite with 1 and with 2 threads. Run it before any change of
#                       dependencies; the tested matrix is in README.md ("Install").
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

COMPAT_PYTHON ?= python3.12
COMPAT_VENV   := .venv-compat
COMPAT_STAMP  := $(COMPAT_VENV)/.installed
# the versions of the compatibility run (a user's environment: torchvision runs beside this torch)
COMPAT_PINS   := torch==2.14.1 torchvision==0.29.1 timm==1.0.31
PYTEST_ARGS   := tests integration_tests libnet_plugin adapters -q

.PHONY: venv reproduce test docs test-compat test-kernels bench clean

$(STAMP): pyproject.toml requirements/constraints.txt
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found (Python 3.11 is required)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c requirements/constraints.txt -e ".[all,test,docs]"
	@touch $(STAMP)

venv: $(STAMP)

reproduce: $(STAMP)
	$(BIN)/libnet reproduce mnist

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest tests integration_tests libnet_plugin adapters -q
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

$(COMPAT_STAMP): pyproject.toml
	@$(COMPAT_PYTHON) -c "import sys; assert sys.version_info >= (3, 12)" >/dev/null 2>&1 || { echo "error: $(COMPAT_PYTHON) (Python 3.12+) not found; set COMPAT_PYTHON=..."; exit 1; }
	$(COMPAT_PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/pip install --quiet --disable-pip-version-check $(COMPAT_PINS)
	$(COMPAT_VENV)/bin/pip install --quiet --disable-pip-version-check -e ".[all,timm,test]"
	@touch $(COMPAT_STAMP)

test-compat: $(COMPAT_STAMP)
	$(COMPAT_VENV)/bin/python -c "import torch, torchvision, timm; print('compat:', torch.__version__, torchvision.__version__, timm.__version__)"
	$(COMPAT_VENV)/bin/pip check
	$(COMPAT_VENV)/bin/python scripts/check_compat_pins.py $(COMPAT_PINS)
	OMP_NUM_THREADS=1 $(COMPAT_VENV)/bin/python -m pytest $(PYTEST_ARGS) -p no:cacheprovider
	OMP_NUM_THREADS=2 $(COMPAT_VENV)/bin/python -m pytest $(PYTEST_ARGS) -p no:cacheprovider

# The suite with the CPU kernels of another machine: ATen's and MKL's AVX2 code paths (an AVX2-only Intel or AMD CPU)
# and their generic ones, one thread each (what another CPU or math library rounds differently; not part of CI).
test-kernels: $(STAMP)
	ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 OMP_NUM_THREADS=1 $(BIN)/python -m pytest $(PYTEST_ARGS) -p no:cacheprovider
	ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2 OMP_NUM_THREADS=1 $(BIN)/python -m pytest $(PYTEST_ARGS) -p no:cacheprovider

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf $(VENV) $(COMPAT_VENV) runs site .pytest_cache .hypothesis

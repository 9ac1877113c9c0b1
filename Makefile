# Two commands set up a fresh machine (see README.md):
#   make reproduce   -> builds .venv, runs `libnet reproduce mnist` on the embedded default data
#   make test        -> builds .venv, runs ruff, then tests/, integration_tests/ and the docstring examples
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv reproduce test bench clean

$(STAMP): pyproject.toml requirements/constraints.txt
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found (Python 3.11 is required)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c requirements/constraints.txt -e ".[all,test]"
	@touch $(STAMP)

venv: $(STAMP)

reproduce: $(STAMP)
	$(BIN)/libnet reproduce mnist

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest tests integration_tests libnet_plugin adapters -q

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis

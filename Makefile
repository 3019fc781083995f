# Two entry points: `make demo` (set up + demo audit) and `make test` (set up + tests).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is needed only by the torch generators/descriptors and the tests. On this
# machine 2.13.0 is a CPU wheel on local disk; an unpinned torch pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: setup setup-test demo test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

setup: $(BIN)/python
	$(BIN)/pip install -q -e .

setup-test: $(BIN)/python
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test]"

demo: setup
	$(BIN)/modeaudit audit --generator synthetic:planted --reference-generator synthetic:null --preset demo --out demo-run --overwrite
	@echo "open demo-run/report.html"

test: setup-test
	$(BIN)/python -m pytest -q

bench: setup-test
	$(BIN)/python benchmarks/bench_join.py

clean:
	rm -rf demo-run .pytest_cache

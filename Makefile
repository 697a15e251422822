# lpc: `make demo` compresses and evaluates the real model; `make test` runs the test suite.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
ASSETS ?= ../shared/assets
MODEL  ?= $(ASSETS)/models/stories260K
DATA   ?= $(ASSETS)/data/tinystories/calib.jsonl
EVAL   ?= $(ASSETS)/data/tinystories/heldout.jsonl
RECIPE ?= nvfp4
OUT    ?= runs/demo-$(RECIPE)
OFFLINE ?= 1

BIN := $(VENV)/bin
export HF_HUB_OFFLINE := $(OFFLINE)
export HF_DATASETS_OFFLINE := $(OFFLINE)
export LPC_ASSETS := $(abspath $(ASSETS))

.PHONY: demo test test-slow bench clean peers

$(BIN)/lpc: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"   # pinned first: an unpinned torch pulls CUDA wheels
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

demo: $(BIN)/lpc
	$(BIN)/lpc compress $(MODEL) --recipe $(RECIPE) --data $(DATA) --ppl $(EVAL) -o $(OUT) --overwrite

test: $(BIN)/lpc
	$(BIN)/python -m pytest tests -q

test-slow: $(BIN)/lpc   # the real-model tier (SmolLM2 through ../shared/assets/smollm2/get.sh): tens of minutes on 2 cores
	$(BIN)/python -m pytest tests -q -m slow

bench: $(BIN)/lpc
	$(BIN)/python bench/formats.py

# Peers (llm-compressor) in their own venv, never a dependency of lpc: `make peers` runs bench/peers.py.
PEERS_VENV ?= .venv-peers
LLMCOMPRESSOR ?= llmcompressor==0.14.0.1
$(PEERS_VENV)/bin/llmcompressor-ok:
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install -q --upgrade pip
	$(PEERS_VENV)/bin/pip install -q "$(TORCH)"   # pinned first: an unpinned torch pulls CUDA wheels
	$(PEERS_VENV)/bin/pip install -q "$(LLMCOMPRESSOR)" "$(TORCH)"
	touch $@

peers: $(PEERS_VENV)/bin/llmcompressor-ok $(BIN)/lpc
	$(PEERS_VENV)/bin/python bench/peers.py $(PEERS_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache

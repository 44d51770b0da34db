# flashsae: `make train` and `make test` each work from a fresh clone (they run setup first).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# A CUDA build of torch where a GPU is visible, the CPU build elsewhere.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
TORCH ?= $(if $(HAS_GPU),torch,torch==2.13.0)

# Make variables in capitals pass through to `python -m flashsae.train` (NPROC: see train).
FLAGS := MODEL SITE ARCH N_LATENTS K TOKENS BATCH_SIZE LR SPARSITY_COEFF TARGET_L0 EVAL_BATCH_SIZE CACHE OUT DEVICE SEED TEXT TEXT_FIELD SWEEP
TRAIN_ARGS := $(foreach v,$(FLAGS),$(if $($(v)),--$(subst _,-,$(shell echo $(v) | tr A-Z a-z)) $($(v))))

.PHONY: setup train test lint bench gpu-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[train,dev,hf,datasets]"
	touch $(STAMP)

# NPROC=N (N > 1): N data-parallel processes on this machine (torchrun; one per GPU).
LAUNCH := $(if $(filter-out 0 1,$(NPROC)),$(VENV)/bin/torchrun --standalone --nproc-per-node $(NPROC),$(PY))

train: $(STAMP)
	$(LAUNCH) -m flashsae.train $(TRAIN_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# CPU-capable benchmarks always; kernel benchmarks where a GPU is visible.
bench: $(STAMP)
	$(PY) bench/cache_bench.py
	$(PY) bench/ground_truth.py
ifneq ($(HAS_GPU),)
	$(PY) bench/topk_bench.py
	$(PY) bench/arch_bench.py
endif

# On a GPU box as it is (offline, no wandb, flashsae not installed): no setup, the system Python.
gpu-check:
	$(PYTHON) bench/gpu_check.py

clean:
	rm -rf $(VENV) runs

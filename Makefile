# One-command entry points. `make train` and `make test` set up .venv first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# What `make train` needs (torch, deepspeed, the project and the demo's data packages), then
# the test and lint tools on top (`make setup`, `make test`).
STAMP := $(VENV)/.mm_moe_installed
DEV_STAMP := $(VENV)/.mm_moe_dev_installed
# The CPU wheel that machines without a GPU use (a plain `torch` would pull a CUDA build).
# Where `nvidia-smi -L` lists GPUs, scripts/torch_setup.sh installs torch==2.13.0 built for
# CUDA instead, and replaces a CPU-only torch found in .venv or the system.
TORCH_CPU := torch==2.13.0
# GPUs listed but .venv's torch is CPU-only (or not 2.13): set .venv up again to replace it.
TORCH_STALE := $(shell [ -x $(PY) ] && bash scripts/torch_setup.sh stale $(PY) && echo stale)
# Processes of `make train`: one per GPU where there are GPUs, else 2 CPU processes.
NPROC ?= $(shell n=$$(nvidia-smi -L 2>/dev/null | grep -c '^GPU'); \
  if [ "$${n:-0}" -gt 0 ]; then echo $$n; else echo 2; fi)
ARGS ?=
# When make started: the demo report states the whole wall time of `make train`.
MAKE_STARTED := $(shell date +%s)

.PHONY: setup setup-run demo-assets train test test-slurm test-fast gpu-check lint format clean FORCE

setup: $(DEV_STAMP)
setup-run: $(STAMP)

$(STAMP): pyproject.toml Makefile $(if $(TORCH_STALE),FORCE)
	@# Reuse a torch that is already installed (e.g. an NVIDIA PyTorch image) through the
	@# system site-packages; otherwise create an isolated venv and install torch into it.
	@if [ ! -x $(PY) ]; then \
	  if $(PYTHON) -c "import torch" >/dev/null 2>&1; then \
	    echo "[setup] found torch in $(PYTHON); creating $(VENV) on top of it"; \
	    $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else \
	    $(PYTHON) -m venv $(VENV); \
	  fi; \
	fi
	@# --no-compile: pip's byte-compiling of every file of every package took a minute of the
	@# demo's ten. `make train` compiles what it imports beside the corpus build, `make setup`
	@# everything on all cores (DEV_STAMP). Two pip runs, not four: each run resolves again.
	@# Which torch (scripts/torch_setup.sh): kept, the CPU wheel, or torch==2.13.0 for CUDA
	@# where GPUs are listed; then a CPU build meeting GPUs stops the setup in one line.
	@torch=$$(bash scripts/torch_setup.sh choose $(PY) "$(TORCH_CPU)") || exit 1; \
	$(PIP) install -q --no-compile --upgrade pip setuptools wheel $$torch && \
	bash scripts/torch_setup.sh verify $(PY)
	@# DeepSpeed ships only an sdist whose build imports torch: built against ours (no build
	@# isolation, which also spares the project's own build an environment of its own).
	$(PIP) install -q --no-compile --no-build-isolation "deepspeed>=0.18,<0.20" -e ".[demo]"
	@touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(PIP) install -q --no-compile --no-build-isolation -e ".[dev,demo]"
	$(PY) -m compileall -q -j 0 "$$($(PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" >/dev/null || true
	@touch $(DEV_STAMP)

DEMO_CORPUS := data/demo/corpus.json
DEMO_TOKENIZERS := tokenizers/demo/vq.pt
# Expert-parallel size; 0 takes the largest that divides NPROC and the experts per group.
EP ?= 0

# The demo corpus (real data that packages ship) and the tokenizers trained on it: built once,
# cached after that (delete data/demo or tokenizers/demo to rebuild).
$(DEMO_CORPUS): | $(STAMP)
	@# The corpus build keeps one core busy; the other compiles the bytecode of what the
	@# tokenizers, the trainer and the report import (scripts/precompile_imports.py).
	$(PY) scripts/precompile_imports.py 2>/dev/null & \
	$(PY) data_pipelines/build_demo_corpus.py output=data/demo overwrite=true; \
	status=$$?; wait; exit $$status

$(DEMO_TOKENIZERS): $(DEMO_CORPUS)
	@# Side by side (they write different files): sentencepiece's seconds hide in the VQ-VAE's.
	@# overwrite=true: make runs this only when vq.pt is missing or older than the corpus, and
	@# then the tokenizers there (a half-built pair, or one of an older corpus) are to go.
	$(PY) -m mm_moe.tokenization.train_text \
	  "sources=[data/demo/text,data/demo/pairs,data/demo/interleaved]" \
	  output=tokenizers/demo vocab_size=2048 overwrite=true & text=$$!; \
	$(PY) -m mm_moe.tokenization.train_image "sources=[data/demo/pairs]" \
	  "heldout=[data/demo/heldout]" output=tokenizers/demo overwrite=true; \
	status=$$?; wait $$text && exit $$status

demo-assets: $(DEMO_TOKENIZERS)

# The main job: the tiny MoMa on the demo corpus, expert parallel over $(NPROC) CPU processes
# (or GPUs), then samples, captions and a summary. A fresh run each time; more overrides
# with ARGS="...". The micro-batch is the global batch / NPROC (experiment=demo).
train: setup-run demo-assets
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) -m mm_moe.train \
	  experiment=demo parallel.expert_parallel_size=$(EP) checkpoint.overwrite=true $(ARGS)
	$(PY) scripts/demo_report.py runs/demo --started $(MAKE_STARTED)

# Two pytest workers (the CI machine's cores); a test file runs on one worker, so its
# module fixtures are built once.
TEST_WORKERS ?= 2

# Never the Slurm test (as root it installs packages and starts daemons): `make test-slurm`.
test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --timeout=900 -m "not slurm" tests $(ARGS)

# The launcher test under a real single-node Slurm (installs Debian's slurm packages; root).
test-slurm: setup
	$(PY) -m pytest -q -m slurm tests/slurm $(ARGS)

# Validate a GPU machine: the gpu tests, the CUDA benchmarks and a 50-step 1.4B MoMa run, into
# runs/gpu_check.json (about 8 minutes on one H100/H200). Without a GPU: one line, exit 0;
# GPUs listed but a CPU-only torch: one line naming it, exit 1.
gpu-check: setup
	$(PY) scripts/gpu_check.py --out runs/gpu_check.json $(ARGS)

test-fast: setup
	$(PY) -m pytest -q tests/unit $(ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf runs outputs .pytest_cache

FORCE:

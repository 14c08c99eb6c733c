# The two commands the README starts with, plus the slow tier CI also runs.
#   make demo   fine-tune a tiny model on a small video dataset this repo makes itself (offline, CPU, minutes)
#   make test   install into .venv and run the default test suite
#   make bench  the CPU benchmarks of bench/ (~12 min on 2 cores), results in bench/results/
#   make mutants  plant 33 realistic defects one at a time and check the tests kill each (tests/mutants.py)
# TORCH picks the PyTorch build: the default is PyPI's (CUDA 13, runs on CPU too) with its torchvision, which
# transformers' Phi-4-multimodal image processor needs (PyPI's torchvision does not load with a +cpu torch). For
# another CUDA version use its index, or install torch and torchvision yourself first and pass TORCH=torch.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.14.1 torchvision==0.29.1
PY := $(VENV)/bin/python

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH) -r requirements.txt -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -m "not slow" -q

test-slow: $(VENV)/.installed
	$(PY) -m pytest -m slow -q

demo: $(VENV)/.installed
	$(PY) demo.py

bench: $(VENV)/.installed
	$(PY) bench/run_all.py

mutants: $(VENV)/.installed
	$(PY) tests/mutants.py

lint: $(VENV)/.installed
	$(PY) -m ruff check .

.PHONY: install test test-slow demo bench mutants lint check-full-size check-phi4-meta

# The 4.2B model end to end on CPU (random weights, bf16, LoRA and QLoRA, one step, save, merged export, reload):
# ~47 min on 2 busy cores, ~17 GB of disk, peak 12.7 GiB of memory (the LoRA step; the export, merged shard by
# shard, 5.6 GiB). Run by hand.
check-full-size: $(VENV)/.installed
	/usr/bin/time -v $(PY) bench/check_full_size.py

# Phi-4-multimodal-instruct at full size without weights (seconds, CPU): the official config on the meta device,
# its tensor names and counts (1536, 1535 saved), parameters per part, SigLIP and decoder shapes.
check-phi4-meta: $(VENV)/.installed
	$(PY) bench/check_full_size.py --stages phi4_meta

# make demo  — set up .venv (CPU torch) and train the demo
# make test  — set up .venv and run the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: setup demo test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Torch first, pinned to the CPU build that lies on disk, so the package's torch>=2.2 installs nothing more.
# snnTorch and Norse (for the NIR interop tests, tests/test_nir_runs.py) alone: their own requirements would pull
# a CUDA torch (and torchvision).
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps "snntorch==1.0.0" "norse==1.1.0" "nirtorch>=2.0,<3"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/fewstep demo

test: setup
	$(BIN)/python -m pytest -q -ra tests

# SpikingJelly 2.0 declares torchvision/torchaudio, which would replace the CPU torch: install it alone.
$(VENV)/.bench: $(VENV)/.installed
	$(BIN)/python -m pip install -q --no-deps "spikingjelly==2.0.0"
	$(BIN)/python -m pip install -q -e ".[bench]"
	touch $@

bench: $(VENV)/.bench
	$(BIN)/python bench/train_step.py
	$(BIN)/python bench/lif_kernel.py
	$(BIN)/python bench/anytime.py
	$(BIN)/python bench/events.py

clean:
	rm -rf $(VENV) fewstep-demo .pytest_cache

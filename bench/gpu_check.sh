#!/usr/bin/env bash
# One-command check of the CUDA path on a machine with one NVIDIA GPU (about 8 minutes with the installs):
#   bench/gpu_check.sh            # a fresh virtual environment in .venv-gpu, the CUDA tests, then the 1B throughput
# 1. tests/test_cuda.py (pytest -m cuda): bf16 KL exactly 0 before training and the first-minibatch ratio 1, the bf16
#    KV cache, and a 1B-shaped iteration's peak memory against bench/memory.py's memory model;
# 2. python bench/throughput.py --size 1b: the scripts' time split against the floor of their passes
#    (bench/results/throughput_1b_cuda.md, the table the README's throughput section takes).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d .venv-gpu ]; then
  python3 -m venv .venv-gpu
  .venv-gpu/bin/python -m pip install -q --upgrade pip
  .venv-gpu/bin/python -m pip install -q torch==2.13.0   # the CUDA build from PyPI
  .venv-gpu/bin/python -m pip install -q -r requirements.txt
fi
.venv-gpu/bin/python -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'; print(torch.cuda.get_device_name())"
.venv-gpu/bin/python -m pytest -q -n 0 -m cuda tests
.venv-gpu/bin/python bench/throughput.py --size 1b --output-dir bench/results
cat bench/results/throughput_1b_cuda.md

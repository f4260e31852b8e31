#!/usr/bin/env bash
# The optional peers' environment, .venv-baselines: deepinv's own losses (the benchmark's deepinv_* methods,
# scripts/deepinv_baseline.py) on PyPI's torch and torchvision. Not in .venv: deepinv imports torchvision, and
# PyPI's torchvision operators link against PyPI's (CUDA) torch, so with this project's CPU torch build they do
# not load ("operator torchvision::nms does not exist"). PyPI's torch runs on a CPU too; it costs about 3 GB of
# CUDA libraries (docs/benchmark.md, "Peers' own implementations"). TORCH_SPEC picks the torch release;
# torchvision follows it. Ends by importing deepinv, so a broken pair fails here rather than in a benchmark.
set -euo pipefail
VENV="${VENV:-.venv-baselines}" TORCH_SPEC="${TORCH_SPEC:-torch==2.14.1}" source "$(dirname "$0")/env.sh" peers
python -c 'import deepinv, torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__, "deepinv", deepinv.__version__)'

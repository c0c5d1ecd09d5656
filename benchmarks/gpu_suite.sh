#!/usr/bin/env bash
# One-GPU suite (benchmarks/gpu_suite.py): correctness, training throughput and MFU, dense-residual overhead,
# batch-1 decoding and a short `kunlun train`, each section time-boxed, <= 9 minutes in all. Prints a Markdown
# table and writes every figure to --out (default runs/gpu_suite.json). Run from anywhere; it runs in the repo root.
#
#   bash benchmarks/gpu_suite.sh                          # on a machine with one NVIDIA GPU
#   bash benchmarks/gpu_suite.sh --cpu-smoke --out /tmp/gpu_suite_smoke.json   # every section, tiny, on CPU
#   PYTHON=/path/to/python bash benchmarks/gpu_suite.sh   # a given interpreter (default: .venv/bin/python, python3)
set -euo pipefail
GPU_SUITE_T0="$(date +%s.%N)"
export GPU_SUITE_T0
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY="$(command -v python3 || command -v python)"; fi
fi
exec "$PY" benchmarks/gpu_suite.py "$@"

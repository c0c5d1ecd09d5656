#!/usr/bin/env bash
# Rebuild the reports (ablation.md, ablation.json, plots) of the studies kept in results/ from their raw records:
# each study's own `kunlun ablate` command with --report-only (no training, seconds each).
set -euo pipefail
cd "$(dirname "$0")/.."
K=${KUNLUN:-.venv/bin/kunlun}
"$K" ablate --eval bpb,arith,arith-mc --eval-limit 200 --match both --report-only --out results/ablation-500k
"$K" ablate --variants no_transformerx --set mtp_depth=0 --match tokens --seeds 0,1,2,3,4 \
    --eval bpb,arith,arith-mc --eval-limit 200 --report-only --out results/ablation-plain
"$K" ablate --variants no_transformerx --set mtp_depth=0 dense_residual=false --match tokens --seeds 0,1,2,3,4 \
    --eval bpb,arith,arith-mc --eval-limit 200 --report-only --out results/ablation-plain-nodense
"$K" ablate --variants full,llama --seeds 0 --match tokens --tokens 2000000 --eval bpb --report-only \
    --out results/ablation-2m
# kunlun curate on the stdlib + Debian FAQ corpus: its curation_report.md and plot from the raw curation_report.json
PY=${PYTHON:-.venv/bin/python}
PYTHONPATH=src "$PY" benchmarks/curate_mixed.py --report-only --out results/curate-mixed

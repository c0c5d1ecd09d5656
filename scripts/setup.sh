#!/usr/bin/env bash
# Set up a virtual environment in .venv with kunlunbaize installed (editable).
#   bash scripts/setup.sh          # torch + kunlunbaize with the training extras
#   bash scripts/setup.sh --dev    # + every optional extra and the test and lint tools
# Without a GPU it installs the CPU build of torch, never the multi-GB CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --disable-pip-version-check -q)

have_torch() {
  .venv/bin/python - <<'PYEOF' 2>/dev/null
import sys, torch
major, minor = (int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
sys.exit(0 if (major, minor) >= (2, 5) else 1)
PYEOF
}

if ! have_torch; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: GPU found, installing torch with CUDA"
    "${PIP[@]}" "torch>=2.5"
  else
    echo "setup: no GPU, installing the CPU build of torch"
    # A local wheel (pip's find-links) or PyTorch's CPU index; never the CUDA wheels from PyPI.
    "${PIP[@]}" "torch==2.13.0+cpu" 2>/dev/null \
      || "${PIP[@]}" "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
  fi
fi

# numpy is optional for torch but it warns at import without it.
"${PIP[@]}" numpy
if [ "${1:-}" = "--dev" ]; then
  "${PIP[@]}" -e ".[dev]"
  # bubblewrap: the code sandbox's strongest isolation level (bwrap+uid), tested by tests/test_sandbox.py.
  # Installed only as root on Debian/Ubuntu; anywhere else (or if apt fails) the sandbox uses its next level.
  if ! command -v bwrap >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap) >/dev/null 2>&1 \
        && echo "setup: installed bubblewrap (the code sandbox's bwrap+uid level)" \
        || echo "setup: note: could not install bubblewrap; the code sandbox runs without it (docs/guide-eval.md)"
    else
      echo "setup: note: bubblewrap (bwrap) is not installed; the code sandbox uses a weaker level (docs/guide-eval.md)"
    fi
  fi
else
  "${PIP[@]}" -e ".[train]"
fi
if [ "${1:-}" = "--dev" ]; then
  # transformers' own common model tests (tests/test_hf_common.py) come from the source distribution of the installed
  # version; the tests read them from this folder and never download. Offline: the tests skip and say so.
  TF=$(.venv/bin/python -c "import transformers; print(transformers.__version__)" 2>/dev/null || true)
  if [ -n "$TF" ] && [ ! -f ".cache/transformers-tests/transformers-$TF.tar.gz" ]; then
    mkdir -p .cache/transformers-tests
    .venv/bin/python -m pip download --disable-pip-version-check -q --no-deps --no-binary :all: \
        -d .cache/transformers-tests "transformers==$TF" >/dev/null 2>&1 \
      || echo "setup: note: could not download the transformers $TF source distribution (offline?);" \
              "tests/test_hf_common.py will skip"
  fi
fi
.venv/bin/python -c "import torch, kunlunbaize; print(f'setup: kunlunbaize {kunlunbaize.__version__}, torch {torch.__version__}')"

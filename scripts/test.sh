#!/usr/bin/env bash
# Set up (with test tools) and run the whole check: ruff, then the test suite, one pytest-xdist worker per core
# (at most 4; each session fixture is built once per worker; idle workers steal queued tests, so a slow test near
# the end does not leave the other worker waiting). It prints the 25 slowest tests and the failures, not every skip.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
.venv/bin/ruff check .
.venv/bin/python -m pytest -q -n auto --maxprocesses 4 --dist worksteal --durations=25 -rfE "$@"

#!/usr/bin/env bash
# Create .venv (if missing) and install the project for CPU: torch pinned to the CPU build first,
# then act_core with its diffusers/demo/test extras. Idempotent; used by run_demo.sh and run_tests.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[cpu,demo,test]"

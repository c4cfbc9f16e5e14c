#!/usr/bin/env bash
# Set up (scripts/setup.sh, a real ComfyUI from ../shared/comfyui when the archive is there, and Debian's
# Chromium for the browser test where apt-get works), lint, then run the whole test suite, the real-ComfyUI
# and browser tests included. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
comfyui=$(bash scripts/setup_comfyui.sh)
if [ -n "$comfyui" ]; then
  export COMFYUI_PATH="$comfyui"
  echo "run_tests: ComfyUI tests run against $COMFYUI_PATH" >&2
else
  echo "run_tests: no ComfyUI archive in ../shared/comfyui and no COMFYUI_PATH: the ComfyUI tests skip" >&2
fi
bash scripts/setup_browser.sh || true   # Chromium + chromedriver (apt) for the browser test; quiet if it cannot
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest -m "slow or not slow" "$@"   # every test, the slow ones too

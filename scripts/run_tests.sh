#!/usr/bin/env bash
# Set up (scripts/setup.sh), lint, then run the whole test suite. ComfyUI tests skip unless COMFYUI_PATH is set.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"

#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the main job on the shipped shapes model: fit ACT maps, write the
# lambda-sweep grid, the score plot and table to outputs/demo/. No download; about 11 minutes on one core (11 min 22 s measured 2026-12-02).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m demo "$@"

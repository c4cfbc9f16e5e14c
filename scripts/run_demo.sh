#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the main job on the shipped shapes model: fit ACT maps, write the
# lambda-sweep grid, the score plot and table to outputs/demo/. No download; about 35 minutes on one core (33 min 23 s of CPU, 34 min 24 s wall on a 2-core machine, 2026-12-03).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m demo "$@"

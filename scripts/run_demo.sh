#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the main job on the shipped shapes model: fit ACT maps, write the
# lambda-sweep grid, the score plot and table to outputs/demo/. No download; about 20 CPU minutes on one core (18 min 33 s of CPU, 41 min wall on a busy 2-core machine, 2026-12-03).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m demo "$@"

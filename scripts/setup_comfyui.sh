#!/usr/bin/env bash
# Prepare a real ComfyUI for the integration tests, inside the project's .venv (used by run_tests.sh).
#
# Looks for the ComfyUI source archive in $COMFYUI_ARCHIVE or ../shared/comfyui/ComfyUI-*.tar.gz; when there
# is none (and COMFYUI_PATH is unset) it does nothing and the ComfyUI tests skip, saying why. Otherwise it
# unpacks the archive into .comfyui/ (outside the package, gitignored), installs ComfyUI's requirements
# into .venv WITHOUT torch/torchvision/torchaudio and with torch pinned in the same command (else pip pulls a
# CUDA build), uninstalls PyPI's torchvision (it cannot load beside CPU torch; the tests carry a stand-in),
# and prints the COMFYUI_PATH to use. Re-running is fast: a marker records the archive already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
PIP=("$PY" -m pip install -q --disable-pip-version-check)
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

if [ -n "${COMFYUI_PATH:-}" ]; then
  echo "$COMFYUI_PATH"
  exit 0
fi
archive=${COMFYUI_ARCHIVE:-$(ls ../shared/comfyui/ComfyUI-*.tar.gz 2>/dev/null | head -n 1 || true)}
if [ -z "$archive" ] || [ ! -f "$archive" ]; then
  exit 0
fi
marker=.comfyui/.installed
stamp="$(basename "$archive") $(stat -c %s "$archive")"
if [ -f "$marker" ] && [ "$(cat "$marker")" = "$stamp" ] && [ -f .comfyui/ComfyUI/main.py ]; then
  echo "$PWD/.comfyui/ComfyUI"
  exit 0
fi
echo "setup_comfyui: unpacking $archive into .comfyui/" >&2
rm -rf .comfyui/ComfyUI
mkdir -p .comfyui
tar -xzf "$archive" -C .comfyui
[ -f .comfyui/ComfyUI/main.py ] || { echo "setup_comfyui: $archive has no ComfyUI/main.py" >&2; exit 1; }
requirements=$(mktemp)
trap 'rm -f "$requirements"' EXIT
grep -viE '^[[:space:]]*(torch|torchvision|torchaudio)[[:space:]]*([<>=!~;[].*)?$' .comfyui/ComfyUI/requirements.txt > "$requirements"
echo "setup_comfyui: installing ComfyUI's requirements (without torch, torchvision, torchaudio)" >&2
"${PIP[@]}" "$TORCH_SPEC" -r "$requirements" requests >&2
if "$PY" -m pip show -q torchvision >/dev/null 2>&1 && ! "$PY" -c 'import torchvision' >/dev/null 2>&1; then
  "$PY" -m pip uninstall -y -q torchvision >&2
fi
echo "$stamp" > "$marker"
echo "$PWD/.comfyui/ComfyUI"

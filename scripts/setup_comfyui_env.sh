#!/usr/bin/env bash
# Create a Python venv that can run a ComfyUI source tree on the CPU together with this repo, for the
# ComfyUI integration tests (tests/test_comfy_*.py) and for trying the node pack by hand.
#
#   scripts/setup_comfyui_env.sh [COMFYUI_DIR] [VENV_DIR]
#
# COMFYUI_DIR  a ComfyUI source tree (default: $COMFYUI_PATH). This script does NOT download ComfyUI;
#              get a source tree yourself and keep it outside this repo.
# VENV_DIR     where to create the venv (default: $COMFYUI_VENV or <repo>/.comfyui/venv, gitignored).
#
# Environment: PYTHON (default python3), TORCH_SPEC (default torch==2.13.0: the CPU build on our machines;
# an unpinned torch makes pip pull a multi-GB CUDA build).
#
# What it does (only PyPI is used):
#   1. pip install "$TORCH_SPEC" first;
#   2. ComfyUI's requirements.txt without torch/torchvision/torchaudio, with torch pinned in the same
#      command (otherwise spandrel/kornia drag in another torch), plus requests and pytest;
#   3. pip install -e "<repo>[diffusers,test]";
#   4. PyPI's torchvision (pulled in by spandrel) does not load beside CPU torch ("operator torchvision::nms
#      does not exist") and then breaks imports: it is uninstalled, and a two-file stub package (all that
#      ComfyUI's SDXL path needs: `from torchvision import transforms`) is put on the venv's path with a .pth.
# Re-running it is safe. At the end it prints the variables to export.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
COMFY_DIR="${1:-${COMFYUI_PATH:-}}"
VENV_DIR="${2:-${COMFYUI_VENV:-$REPO_ROOT/.comfyui/venv}}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

die() { echo "setup_comfyui_env: $*" >&2; exit 1; }

[ -n "$COMFY_DIR" ] || die "give a ComfyUI source tree as the first argument or in COMFYUI_PATH"
COMFY_DIR="$(cd "$COMFY_DIR" && pwd)" || die "no such directory: $COMFY_DIR"
[ -f "$COMFY_DIR/main.py" ] && [ -f "$COMFY_DIR/requirements.txt" ] && [ -d "$COMFY_DIR/comfy" ] \
  || die "$COMFY_DIR does not look like a ComfyUI source tree (main.py, requirements.txt, comfy/)"

echo "== ComfyUI: $COMFY_DIR (version $(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$COMFY_DIR/comfyui_version.py" 2>/dev/null || echo '?'))"
echo "== venv:    $VENV_DIR"

if [ ! -x "$VENV_DIR/bin/python" ]; then
  mkdir -p "$(dirname "$VENV_DIR")"
  "$PYTHON" -m venv "$VENV_DIR"
fi
PY="$VENV_DIR/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)

echo "== 1/4 $TORCH_SPEC"
"${PIP[@]}" install -q "$TORCH_SPEC"

echo "== 2/4 ComfyUI requirements (without torch, torchvision, torchaudio)"
REQ="$(mktemp)"
trap 'rm -f "$REQ"' EXIT
grep -viE '^[[:space:]]*(torch|torchvision|torchaudio)[[:space:]]*([<>=!~;[].*)?$' "$COMFY_DIR/requirements.txt" > "$REQ"
"${PIP[@]}" install -q "$TORCH_SPEC" -r "$REQ" requests pytest

echo "== 3/4 this repo (editable, [diffusers,test])"
"${PIP[@]}" install -q "$TORCH_SPEC" -e "$REPO_ROOT[diffusers,test]"

echo "== 4/4 torchvision"
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
STUB_ROOT="$VENV_DIR/comfyui-act-stubs"
rm -f "$SITE/comfyui_act_torchvision_stub.pth"   # judge the real package on its own
if "${PIP[@]}" show -q torchvision >/dev/null 2>&1; then
  if "$PY" -c 'import torchvision' >/dev/null 2>&1; then
    echo "   a working torchvision is installed; no stub"
  else
    echo "   installed torchvision does not import beside this torch: uninstalling it"
    "${PIP[@]}" uninstall -y -q torchvision
  fi
fi
if ! "${PIP[@]}" show -q torchvision >/dev/null 2>&1; then
  mkdir -p "$STUB_ROOT/torchvision"
  printf '"""torchvision stub for ComfyUI on CPU torch (no real torchvision installed)."""\nfrom . import transforms  # noqa: F401\n\n__version__ = "0.0.0+stub"\n' \
    > "$STUB_ROOT/torchvision/__init__.py"
  printf '"""Empty: ComfyUI only needs `from torchvision import transforms` to succeed at import time."""\n' \
    > "$STUB_ROOT/torchvision/transforms.py"
  echo "$STUB_ROOT" > "$SITE/comfyui_act_torchvision_stub.pth"
  echo "   stub package in $STUB_ROOT (on the venv's path via comfyui_act_torchvision_stub.pth)"
fi

echo "== check"
"$PY" - "$COMFY_DIR" <<'EOF'
import sys

import torch

comfy_dir = sys.argv[1]
print(f"   torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})")
sys.path.insert(0, comfy_dir)
from comfy.cli_args import args

args.cpu = True
import comfy.model_management as mm
import comfy.sd  # noqa: F401

print(f"   comfy imports; device: {mm.get_torch_device()}")
EOF
"${PIP[@]}" list 2>/dev/null | grep -iE '^(torch|torchvision|torchaudio|nvidia)' | sed 's/^/   /'

cat <<EOF

Done. To run the ComfyUI integration tests:
  export COMFYUI_PATH="$COMFY_DIR"
  cd "$REPO_ROOT" && "$PY" -m pytest tests/test_comfy_fixture.py tests/test_comfy_server.py -q
To start ComfyUI by hand with this repo as a custom node pack:
  ln -s "$REPO_ROOT" "$COMFY_DIR/custom_nodes/ComfyUI-ACT"   # or use an extra_model_paths.yaml 'custom_nodes:' entry
  cd "$COMFY_DIR" && "$PY" main.py --cpu --listen 127.0.0.1 --port 8188 --disable-api-nodes
EOF

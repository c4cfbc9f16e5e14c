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
#      does not exist") and then breaks imports: it is uninstalled. ComfyUI only needs
#      `from torchvision import transforms` to succeed: tests/comfy_support.py provides an in-memory
#      stand-in for the tests, and <venv>/comfyui-act-stubs/sitecustomize.py does it for by-hand runs.
#      The stand-in is NOT put on the venv's path for good: transformers treats any importable
#      `torchvision` as the real one and then fails to import its models.
# Re-running it is safe. At the end it prints what to export / run.
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
STUB_DIR="$VENV_DIR/comfyui-act-stubs"
rm -f "$SITE/comfyui_act_torchvision_stub.pth"   # left by an older version of this script
if "${PIP[@]}" show -q torchvision >/dev/null 2>&1; then
  if "$PY" -c 'import torchvision' >/dev/null 2>&1; then
    echo "   a working torchvision is installed; no stand-in needed"
  else
    echo "   installed torchvision does not import beside this torch: uninstalling it"
    "${PIP[@]}" uninstall -y -q torchvision
  fi
fi
STUB_ENV=""
if ! "${PIP[@]}" show -q torchvision >/dev/null 2>&1; then
  "$PY" - "$REPO_ROOT/tests" "$STUB_DIR" <<'PYEOF'
import sys

sys.path.insert(0, sys.argv[1])
import comfy_support

print("   stand-in for by-hand runs:", comfy_support.write_torchvision_stub(sys.argv[2]) / "sitecustomize.py")
PYEOF
  STUB_ENV="PYTHONPATH=\"$STUB_DIR\" "
fi

echo "== check"
COMFYUI_PATH="$COMFY_DIR" "$PY" - "$REPO_ROOT/tests" <<'PYEOF'
import sys

import torch

sys.path.insert(0, sys.argv[1])
import comfy_support

print(f"   torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})")
path = comfy_support.setup_comfy()
import comfy.model_management as mm

print(f"   ComfyUI at {path} imports; device: {mm.get_torch_device()}")
from transformers import CLIPTextModel  # noqa: F401,E402

print("   transformers models import beside it")
PYEOF
"${PIP[@]}" list 2>/dev/null | grep -iE '^(torch|torchvision|torchaudio|nvidia)' | sed 's/^/   /'

cat <<EOF

Done. To run the ComfyUI integration tests:
  export COMFYUI_PATH="$COMFY_DIR"
  cd "$REPO_ROOT" && "$PY" -m pytest tests/test_comfy_fixture.py tests/test_comfy_server.py -q
To start ComfyUI by hand with this repo as a custom node pack:
  ln -s "$REPO_ROOT" "$COMFY_DIR/custom_nodes/ComfyUI-ACT"   # or an extra_model_paths.yaml 'custom_nodes:' entry
  cd "$COMFY_DIR" && ${STUB_ENV}"$PY" main.py --cpu --listen 127.0.0.1 --port 8188 --disable-api-nodes
EOF

"""ComfyUI-ACT: Activation Transport (ACT, Rodriguez et al., ICLR 2025) nodes for ComfyUI.

ComfyUI loads this file as the node pack's entry point and calls ``comfy_entrypoint`` (V3 node API,
ComfyUI >= 0.3.64). Install through ComfyUI-Manager / the registry, or clone the repository into
``ComfyUI/custom_nodes/`` and run ``pip install -r requirements.txt`` with ComfyUI's Python. Only
relative imports are used here: ComfyUI has its own top-level ``nodes`` module.
"""

import logging
import os
import sys

_INSTALL_HINT = (
    "ComfyUI-ACT: the 'act_core' package cannot be imported in this Python. Run, with ComfyUI's Python: "
    "pip install -r ComfyUI/custom_nodes/ComfyUI-ACT/requirements.txt"
)

# act_core lives in src/ (which holds nothing else), so a plain clone works without installing the project.
_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "src")
try:
    import act_core  # noqa: F401
except ImportError:
    if _SRC not in sys.path:
        sys.path.append(_SRC)
    try:
        import act_core  # noqa: F401
    except ImportError as error:
        logging.getLogger("ComfyUI-ACT").error(_INSTALL_HINT)
        raise ImportError(f"{_INSTALL_HINT} ({error})") from error

from .nodes import NODE_IDS, comfy_entrypoint  # noqa: E402
from .nodes.folders import register_act_maps_folder  # noqa: E402

register_act_maps_folder()  # no-op outside ComfyUI

WEB_DIRECTORY = None
__all__ = ["NODE_IDS", "comfy_entrypoint"]

"""ComfyUI-ACT: Activation Transport (ACT, Rodriguez et al., ICLR 2025) nodes for ComfyUI.

ComfyUI loads this file as the node pack's entry point. Install: clone the repository into
``ComfyUI/custom_nodes/`` and run ``pip install -e ComfyUI/custom_nodes/ComfyUI-ACT`` with ComfyUI's Python
(the nodes use the ``act_core`` package that this installs). Only relative imports are used here: ComfyUI
has its own top-level ``nodes`` module.
"""

import logging

_INSTALL_HINT = (
    "ComfyUI-ACT: the 'act_core' package is not installed in this Python. Run, with ComfyUI's Python: "
    "pip install -e ComfyUI/custom_nodes/ComfyUI-ACT"
)

try:
    import act_core  # noqa: F401
except ImportError as error:
    logging.getLogger("ComfyUI-ACT").error(_INSTALL_HINT)
    raise ImportError(f"{_INSTALL_HINT} ({error})") from error

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402
from .nodes.folders import register_act_maps_folder  # noqa: E402

register_act_maps_folder()  # no-op outside ComfyUI

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]

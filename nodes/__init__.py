"""ComfyUI nodes for Activation Transport (ACT). Imported by the repository's root ``__init__.py``.

Nothing here imports ComfyUI at import time (``comfy.*`` and ``folder_paths`` are imported inside the
functions that run the nodes), so the node schemas load and are tested without ComfyUI.
"""

from .act_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]

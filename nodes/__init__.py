"""ComfyUI nodes for Activation Transport (ACT), on ComfyUI's V3 node API.

The repository's root ``__init__.py`` re-exports ``comfy_entrypoint``; ComfyUI calls it to get the
``ComfyExtension`` with the node list. ``comfy_api`` is imported only then, so this package (and the
logic modules beside it) import without ComfyUI.
"""

from __future__ import annotations

NODE_IDS = {
    "ACTFitMap": "Fit ACT map (transport slider)",
    "ACTApply": "Apply ACT (steer, slider)",
    "ACTSaveMap": "Save ACT map",
    "ACTLoadMap": "Load ACT map",
    "ACTExportLoRA": "Export ACT as LoRA",
    "ACTSweep": "ACT lambda sweep (slider preview)",
    "ACTFoldMap": "Fold ACT map (slider into a LoRA)",
    "ACTDemoModel": "ACT demo model",
}


async def comfy_entrypoint():
    """ComfyUI's V3 entry point: the extension that lists the ACT nodes."""
    from .act_nodes import ACTExtension

    return ACTExtension()


__all__ = ["NODE_IDS", "comfy_entrypoint"]

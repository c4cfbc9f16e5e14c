"""The shipped shapes model (a diffusers folder) as ComfyUI's own MODEL, CLIP and VAE, for parity tests.

The loading itself is the node pack's (``nodes/shapes_models.py``, behind the "ACT demo model" node); this
module only sets ComfyUI up and reaches that module through the pack, loaded the way ComfyUI loads it. The
checks that this is the same model: ``test_comfy_parity.py`` and ``test_comfy_demo_model.py`` compare the
text conditioning, a UNet call and the VAE against diffusers.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from comfy_support import load_node_pack, setup_comfy


def shapes_models():
    """The pack's ``nodes.shapes_models`` module (ComfyUI set up first)."""
    setup_comfy()
    return importlib.import_module(f"{load_node_pack().__name__}.nodes.shapes_models")


def load_unet(folder: Path) -> Any:
    """The UNet as a ComfyUI ModelPatcher with the folder's weights, float32 on CPU."""
    return shapes_models().load_unet(folder)


def load_clip(folder: Path) -> Any:
    """Both text encoders as ComfyUI's SDXL CLIP, on the model's own tokenizer, float32."""
    return shapes_models().load_clip(folder)


def load_vae(folder: Path) -> Any:
    """The VAE as ComfyUI's ``comfy.sd.VAE`` (4x), float32."""
    return shapes_models().load_vae(folder)

"""The "ACT demo model" node: the tiny shapes models shipped in ``models/`` as MODEL, CLIP and VAE, so the
pack can be tried offline with nothing to download (loading in ``shapes_models.py``). Imported only inside
ComfyUI (``act_nodes.ACTExtension``)."""

from __future__ import annotations

from comfy_api.latest import io

from .common import CATEGORY
from .shapes_models import IMAGE_SIZE, SHAPES_SDXL, load_shapes_sdxl

DEMO_CATEGORY = f"{CATEGORY}/demo"
DEFAULT_DEMO_MODEL = "shapes-sdxl"


def _settings_help() -> str:
    return "; ".join(
        f"{name}: {steps} steps, cfg {cfg:g}, {sampler}, scheduler {scheduler}"
        for name, (steps, cfg, sampler, scheduler) in SHAPES_SDXL.items()
    )


class ACTDemoModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ACTDemoModel",
            display_name="ACT demo model",
            category=DEMO_CATEGORY,
            description=(
                "A tiny text-to-image model shipped with ComfyUI-ACT (SDXL's architecture, 4.2M parameters, "
                "trained on coloured shapes: prompts like 'a red circle' or 'a blue star, striped'), loaded from "
                "the pack's models/ folder as ComfyUI MODEL, CLIP and VAE: try ACT offline, on a CPU, in "
                f"seconds. It draws {IMAGE_SIZE}x{IMAGE_SIZE} images and its VAE downsamples by 4, not 8: set "
                f"Empty Latent Image and Fit ACT map to {2 * IMAGE_SIZE}x{2 * IMAGE_SIZE} to get "
                f"{IMAGE_SIZE}px images. Sampling settings: {_settings_help()}."
            ),
            inputs=[
                io.Combo.Input(
                    "model_name",
                    options=list(SHAPES_SDXL),
                    default=DEFAULT_DEMO_MODEL,
                    tooltip="shapes-sdxl: the shipped demo model; shapes-sdxl-d: a second, "
                    "independently trained one (other drawing style and sizes).",
                ),
            ],
            outputs=[
                io.Model.Output("model", display_name="MODEL", tooltip="The UNet (SDXL class, float32)."),
                io.Clip.Output("clip", display_name="CLIP", tooltip="Its two text encoders (SDXL CLIP)."),
                io.Vae.Output(
                    "vae", display_name="VAE", tooltip="Its VAE (4x: 8x8 latents are 32x32 images)."
                ),
            ],
        )

    @classmethod
    def execute(cls, model_name) -> io.NodeOutput:
        return io.NodeOutput(*load_shapes_sdxl(model_name))


DEMO_NODES: list[type[io.ComfyNode]] = [ACTDemoModel]

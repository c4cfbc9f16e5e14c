"""SD3 maps in real ComfyUI: ComfyUI's own SD3 MODEL (``OpenAISignatureMMDITWrapper``) with the weights of a tiny
diffusers SD3 transformer is the same model; a map fitted in diffusers steers it exactly as it steers the
diffusers transformer, and the Fit node fits on it through ComfyUI's sampler a map that steers KSampler and
applies to the diffusers pipeline (skipped without COMFYUI_PATH)."""

from __future__ import annotations

import comfy_family_checks as cfc
import comfy_support as cs  # noqa: E402
import pytest
import torch
from comfy_support import comfyui  # noqa: E402,F401  (session fixture)

pytestmark = cs.requires_comfyui

SOURCE = [f"a red circle number {i}" for i in range(4)]
TARGET = [f"a blue square, striped, number {i}" for i in range(4)]
LATENT = (1, 4, 8, 8)  # 2x2 patches: 16 image tokens
PRESETS = ["pooled_text_and_blocks", "transformer_blocks"]


@pytest.fixture(scope="module")
def sd3(comfyui, tmp_path_factory):  # noqa: F811
    import comfy_sd3

    base = comfy_sd3.build_sd3_pipeline(tmp_path_factory.mktemp("tiny_sd3_comfy"))
    return cfc.act_pipe_and_comfy_model(base, comfy_sd3.load_sd3_transformer)


@pytest.fixture(scope="module")
def sd3_clip(comfyui):  # noqa: F811
    import comfy_sd3

    return comfy_sd3.build_sd3_clip(seed=0)


@pytest.fixture(scope="module")
def nodes_pack(comfyui):  # noqa: F811
    return cs.node_callers(cs.load_node_pack())


@pytest.fixture(scope="module")
def sd3_maps(sd3):
    from comfy_sd3 import MAX_SEQUENCE_LENGTH

    pipe, _ = sd3
    sampling = {
        "num_inference_steps": 3,
        "height": 32,
        "width": 32,
        "guidance_scale": 4.0,
        "max_sequence_length": MAX_SEQUENCE_LENGTH,
    }
    return cfc.fit_quietly(pipe, SOURCE, TARGET, PRESETS, **sampling)


@pytest.fixture(scope="module")
def inputs():
    from comfy_sd3 import CONTEXT_WIDTH, MAX_SEQUENCE_LENGTH, POOLED_WIDTH

    generator = torch.Generator().manual_seed(0)
    return {
        "x": torch.randn(LATENT, generator=generator),
        "context": torch.randn(1, MAX_SEQUENCE_LENGTH, CONTEXT_WIDTH, generator=generator),
        "pooled": torch.randn(1, POOLED_WIDTH, generator=generator),
    }


def diffusers_velocity(pipe, inputs, sigma: float) -> torch.Tensor:
    """The diffusers transformer's output at noise level ``sigma`` (timestep 1000 sigma), every row the
    prompt's (no CFG batch in this call: the maps steer it all, as ComfyUI's cond-only call)."""
    from act_core.diffusers.pipeline import active_pipeline

    with torch.no_grad(), active_pipeline(pipe, cfg_batch=False):
        return pipe.transformer(
            hidden_states=inputs["x"],
            timestep=torch.tensor([1000.0 * sigma]),
            encoder_hidden_states=inputs["context"],
            pooled_projections=inputs["pooled"],
            return_dict=False,
        )[0]


def comfy_velocity(patcher, inputs, sigma: float) -> torch.Tensor:
    """ComfyUI's SD3 output for the same inputs, called as its samplers call it (wrappers, sigmas, cond rows)."""
    return cfc.comfy_velocity(patcher, inputs["x"], sigma, c_crossattn=inputs["context"], y=inputs["pooled"])


def test_comfyui_finds_sd3_and_names_its_modules_as_diffusers(sd3):
    from act_core.families import SD3, family_of_comfy_model

    pipe, model = sd3
    diffusion_model = model.model.diffusion_model
    assert type(diffusion_model).__name__ == "OpenAISignatureMMDITWrapper"
    assert family_of_comfy_model(diffusion_model) is SD3
    modules = SD3.comfy_denoiser_modules(diffusion_model, None)
    for preset in PRESETS:
        assert set(pipe.act_preset_modules(preset)) <= set(modules)
    assert modules["transformer.time_text_embed.text_embedder"] is diffusion_model.y_embedder
    last = "transformer.transformer_blocks.1"
    assert f"{last}:image" in modules and f"{last}:text" not in modules  # pre_only: no text output


def test_comfyui_sd3_is_the_same_model(sd3, inputs):
    pipe, model = sd3
    cfc.check_same_model(pipe, model, inputs, comfy_velocity, diffusers_velocity)


@pytest.mark.parametrize("preset", PRESETS)
def test_a_diffusers_fitted_sd3_map_steers_comfyui_sd3_as_diffusers(
    nodes_pack, sd3, sd3_maps, inputs, preset
):
    pipe, model = sd3
    act_map = sd3_maps[preset]
    assert act_map.metadata["family"] == "sd3" and len(act_map.buckets) == 3
    # Every block (and the pooled-text MLP for the default preset) carried a hook while the clone was loaded.
    blocks = {"joint_blocks.0", "joint_blocks.1"}
    cfc.check_a_diffusers_map_steers_comfyui_as_diffusers(
        nodes_pack["ACTApply"].apply,
        pipe,
        model,
        act_map,
        inputs,
        comfy_velocity,
        diffusers_velocity,
        must_hook=blocks | {"y_embedder"} if preset == "pooled_text_and_blocks" else blocks,
    )


def fit_sd3(nodes_pack, model, clip, preset="default", **options):
    """The Fit ACT map node on an SD3 MODEL: 4 prompt pairs, 3 steps, cfg 4 (SD3 runs a CFG batch)."""
    return cfc.fit_node(nodes_pack, model, clip, SOURCE, TARGET, preset=preset, cfg=4.0, **options)[0]


def test_the_fit_node_fits_on_comfyui_sd3_and_the_map_steers_ksampler_and_diffusers(
    nodes_pack, sd3, sd3_clip, inputs, caplog
):
    """Fit ACT map samples with ComfyUI's own sampler on its SD3 MODEL; the map has diffusers' names, steers
    KSampler's output (strength 0 exactly the plain output), and applies to the diffusers transformer."""
    pipe, model = sd3
    act_map = fit_sd3(nodes_pack, model, sd3_clip)
    meta = act_map.metadata
    assert (
        meta["family"] == "sd3" and meta["host"] == "comfyui" and meta["preset"] == "pooled_text_and_blocks"
    )
    assert meta["cfg_rows"] == "cond" and len(act_map.buckets) == 3
    assert set(act_map.modules) == set(pipe.act_preset_modules("pooled_text_and_blocks"))

    def sample(patcher, _clip):  # the transformer map's CLIP is the input one
        return cs.sample_tiny(
            patcher, sd3_clip, "a red circle number 9", seed=3, steps=3, cfg=4.0, size=(8, 8)
        )

    cfc.check_the_map_steers_ksampler(nodes_pack["ACTApply"].apply, model, sd3_clip, act_map, sample, caplog)
    # Portable: the ComfyUI-fitted map steers the diffusers SD3 transformer, every module matched.
    cfc.check_a_comfyui_map_steers_diffusers(pipe, act_map, inputs, diffusers_velocity)


def test_sd3_maps_are_refused_on_other_models_and_do_not_export(nodes_pack, sd3, sd3_maps):
    from act_core.errors import ACTInputError

    _, model = sd3
    act_map = sd3_maps["pooled_text_and_blocks"]
    cfc.check_refused_on_sdxl(nodes_pack["ACTApply"].apply, act_map, "SD3 model.*this MODEL is SDXL")
    cfc.check_no_lora_export(nodes_pack["ACTExportLoRA"].export, model, act_map, "sd3_map")
    with pytest.raises(ACTInputError, match="not a SD3 preset.*pooled_text_and_blocks"):
        fit_sd3(nodes_pack, model, None, preset="unet_norms")

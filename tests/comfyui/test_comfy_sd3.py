"""SD3 maps in real ComfyUI: ComfyUI's own SD3 MODEL (``OpenAISignatureMMDITWrapper``) with the weights of a tiny
diffusers SD3 transformer is the same model; a map fitted in diffusers steers it exactly as it steers the
diffusers transformer, and the Fit node fits on it through ComfyUI's sampler a map that steers KSampler and
applies to the diffusers pipeline (skipped without COMFYUI_PATH)."""

from __future__ import annotations

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

    from act_core.diffusers import act_pipeline

    pipe = act_pipeline(comfy_sd3.build_sd3_pipeline(tmp_path_factory.mktemp("tiny_sd3_comfy")))
    pipe.set_progress_bar_config(disable=True)
    return pipe, comfy_sd3.load_sd3_transformer(pipe.transformer)


@pytest.fixture(scope="module")
def sd3_clip(comfyui):  # noqa: F811
    import comfy_sd3

    return comfy_sd3.build_sd3_clip(seed=0)


@pytest.fixture(scope="module")
def nodes_pack(comfyui):  # noqa: F811
    return cs.node_callers(cs.load_node_pack())


@pytest.fixture(scope="module")
def sd3_maps(sd3):
    import warnings

    from comfy_sd3 import MAX_SEQUENCE_LENGTH

    pipe, _ = sd3
    sampling = {
        "num_inference_steps": 3,
        "height": 32,
        "width": 32,
        "guidance_scale": 4.0,
        "max_sequence_length": MAX_SEQUENCE_LENGTH,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tests' tokenizer does not know these words
        return {
            preset: pipe.fit_act(SOURCE, TARGET, preset=preset, progress=False, **sampling)
            for preset in PRESETS
        }


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
    import comfy.model_management as mm
    import comfy.patcher_extension

    mm.load_models_gpu([patcher])  # patches this clone in (its ACT hooks are injected on load)
    options = {
        "wrappers": comfy.patcher_extension.copy_nested_dicts(patcher.wrappers),
        "sigmas": torch.tensor([sigma]),
        "cond_or_uncond": [0],
    }
    with torch.no_grad():
        denoised = patcher.model.apply_model(
            inputs["x"],
            torch.tensor([sigma]),
            c_crossattn=inputs["context"],
            y=inputs["pooled"],
            transformer_options=options,
        )
    return (inputs["x"] - denoised) / sigma  # ComfyUI's flow models return x - sigma * velocity


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
    for sigma in (1.0, 0.55):
        torch.testing.assert_close(
            comfy_velocity(model, inputs, sigma),
            diffusers_velocity(pipe, inputs, sigma),
            rtol=1e-4,
            atol=1e-4,
        )


@pytest.mark.parametrize("preset", PRESETS)
def test_a_diffusers_fitted_sd3_map_steers_comfyui_sd3_as_diffusers(
    nodes_pack, sd3, sd3_maps, inputs, preset
):
    pipe, model = sd3
    act_map = sd3_maps[preset]
    assert act_map.metadata["family"] == "sd3" and len(act_map.buckets) == 3
    sigma = 0.55  # between two of the map's noise levels: both hosts interpolate the same way
    plain = comfy_velocity(model, inputs, sigma)
    steered_model, _ = nodes_pack["ACTApply"].apply(model, None, act_map, 1.0)
    steered = comfy_velocity(steered_model, inputs, sigma)
    hooked = {n for n, m in model.model.diffusion_model.named_modules() if hasattr(m, "_act_handle")}
    pipe.enable_act(act_map, strength=1.0)
    try:
        expected = diffusers_velocity(pipe, inputs, sigma)
    finally:
        pipe.disable_act()
    assert (steered - plain).abs().max() > 1e-3
    torch.testing.assert_close(steered, expected, rtol=1e-4, atol=1e-4)
    # Every block (and the pooled-text MLP for the default preset) carried a hook while the clone was loaded.
    blocks = {"joint_blocks.0", "joint_blocks.1"}
    assert hooked >= (blocks | {"y_embedder"} if preset == "pooled_text_and_blocks" else blocks)
    # The input MODEL is untouched: loading it again gives the plain output, with no ACT hooks left.
    torch.testing.assert_close(comfy_velocity(model, inputs, sigma), plain, rtol=0, atol=0)
    assert not [n for n, m in model.model.diffusion_model.named_modules() if hasattr(m, "_act_handle")]


def fit_sd3(nodes_pack, model, clip, preset="default", **options):
    """The Fit ACT map node on an SD3 MODEL: 4 prompt pairs, 3 steps, cfg 4 (SD3 runs a CFG batch)."""
    return nodes_pack["ACTFitMap"].fit(
        model,
        clip,
        source_prompts="\n".join(SOURCE),
        target_prompts="\n".join(TARGET),
        preset=preset,
        parts="",
        method="linear",
        support="auto",
        mode="preset",
        fit_seed=0,
        width=64,
        height=64,
        steps=3,
        batch_size=4,
        cfg=4.0,
        **options,
    )[0]


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

    def sample(patcher):
        return cs.sample_tiny(
            patcher, sd3_clip, "a red circle number 9", seed=3, steps=3, cfg=4.0, size=(8, 8)
        )

    caplog.set_level("INFO", logger="ComfyUI-ACT")
    plain = sample(model)
    at_zero, _ = nodes_pack["ACTApply"].apply(model, sd3_clip, act_map, 0.0)
    caplog.clear()
    steered, _ = nodes_pack["ACTApply"].apply(model, sd3_clip, act_map, 1.0)
    assert torch.equal(sample(at_zero), plain)
    assert (sample(steered) - plain).abs().max() > 1e-3
    torch.testing.assert_close(sample(model), plain, rtol=0, atol=0)  # the input MODEL is untouched
    assert "ACT applied" in caplog.text and "left out" not in caplog.text
    # Portable: the ComfyUI-fitted map steers the diffusers SD3 transformer, every module matched.
    pipe.enable_act(act_map, strength=1.0)
    try:
        moved = diffusers_velocity(pipe, inputs, 0.55)
    finally:
        pipe.disable_act()
    assert (moved - diffusers_velocity(pipe, inputs, 0.55)).abs().max() > 1e-3


def test_sd3_maps_are_refused_on_other_models_and_do_not_export(nodes_pack, sd3, sd3_maps):
    from act_core.errors import ACTInputError, ACTModelMismatchError

    _, model = sd3
    act_map = sd3_maps["pooled_text_and_blocks"]
    tiny_sdxl, tiny_clip = cs.build_tiny_sdxl(seed=0)
    with pytest.raises(ACTModelMismatchError, match="SD3 model.*this MODEL is SDXL"):
        nodes_pack["ACTApply"].apply(tiny_sdxl, tiny_clip, act_map, 1.0)
    with pytest.raises(ACTInputError, match="LoRA"):
        nodes_pack["ACTExportLoRA"].export(model, None, act_map, "sd3_map", "fp32", False)
    with pytest.raises(ACTInputError, match="not a SD3 preset.*pooled_text_and_blocks"):
        fit_sd3(nodes_pack, model, None, preset="unet_norms")

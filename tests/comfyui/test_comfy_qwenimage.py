"""Qwen-Image maps in real ComfyUI (skipped without COMFYUI_PATH): the Fit node fits on ComfyUI's own
Qwen-Image model through ComfyUI's sampler, Apply ACT steers KSampler, and maps move between the hosts with
every module matched, on a ComfyUI model with the diffusers transformer's weights (the same model)."""

from __future__ import annotations

import comfy_support as cs  # noqa: E402
import pytest
import torch
from comfy_support import comfyui  # noqa: E402,F401  (session fixture)
from tiny_qwenimage import TEXT_WIDTH, build_tiny_qwenimage

pytestmark = cs.requires_comfyui

SOURCE = [f"a red circle number {i}" for i in range(6)]
TARGET = [f"a blue square, striped, number {i}" for i in range(6)]
LATENT = (1, 4, 1, 8, 8)  # ComfyUI's Qwen-Image latent (4 channels for the tiny VAE, one frame): 16 tokens
TEXT_TOKENS = 7


@pytest.fixture(scope="module")
def qwen(comfyui, tmp_path_factory):  # noqa: F811
    import comfy_qwenimage

    from act_core.diffusers import act_pipeline

    pipe = act_pipeline(build_tiny_qwenimage(tmp_path_factory.mktemp("tiny_qwenimage")))
    pipe.set_progress_bar_config(disable=True)
    return pipe, comfy_qwenimage.load_qwenimage_transformer(pipe.transformer)


@pytest.fixture(scope="module")
def qwen_clip(comfyui):  # noqa: F811
    import comfy_qwenimage

    return comfy_qwenimage.build_qwenimage_clip(seed=0)


@pytest.fixture(scope="module")
def nodes_pack(comfyui):  # noqa: F811
    return cs.node_callers(cs.load_node_pack())


@pytest.fixture(scope="module")
def qwen_maps(qwen):
    import warnings

    pipe, _ = qwen
    sampling = {
        "num_inference_steps": 3,
        "height": 32,
        "width": 32,
        "guidance_scale": 4.0,
        "negative_prompt": "",
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tests' tokenizer does not know these words
        return {
            preset: pipe.fit_act(SOURCE, TARGET, preset=preset, progress=False, **sampling)
            for preset in ("transformer_blocks", "transformer_norms")
        }


@pytest.fixture(scope="module")
def inputs():
    generator = torch.Generator().manual_seed(0)
    return {
        "x": torch.randn(LATENT, generator=generator),
        "context": torch.randn(1, TEXT_TOKENS, TEXT_WIDTH, generator=generator),
    }


def diffusers_velocity(pipe, inputs, sigma: float) -> torch.Tensor:
    """The diffusers transformer's output at noise level ``sigma``, unpacked to ComfyUI's latent layout."""
    batch, channels, _, height, width = LATENT
    with torch.no_grad():
        packed = pipe._pack_latents(inputs["x"], batch, channels, height, width)
        out = pipe.transformer(
            hidden_states=packed,
            timestep=torch.tensor([sigma]),
            encoder_hidden_states=inputs["context"],
            img_shapes=[[(1, height // 2, width // 2)]],
            return_dict=False,
        )[0]
    scale = pipe.vae_scale_factor
    return pipe._unpack_latents(out, height * scale, width * scale, scale)


def comfy_velocity(patcher, inputs, sigma: float) -> torch.Tensor:
    """ComfyUI's Qwen-Image output for the same inputs, called as its samplers call it (wrappers, sigmas)."""
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
            inputs["x"], torch.tensor([sigma]), c_crossattn=inputs["context"], transformer_options=options
        )
    return (inputs["x"] - denoised) / sigma  # ComfyUI's flow models return x - sigma * velocity


def hooked(patcher) -> set[str]:
    """The canonical names whose ComfyUI module carries ACT hooks (a stream's: its block's)."""
    from act_core.families.qwenimage import comfy_transformer_modules

    modules = comfy_transformer_modules(patcher.model.diffusion_model)
    return {
        name for name, module in modules.items() if hasattr(getattr(module, "module", module), "_act_handle")
    }


def test_comfyui_qwenimage_is_the_same_model_with_the_same_module_names(qwen, inputs):
    from act_core.families import family_of_comfy_model
    from act_core.families.qwenimage import comfy_transformer_modules

    pipe, model = qwen
    assert family_of_comfy_model(model.model.diffusion_model) is pipe.act_family
    for sigma in (1.0, 0.55):
        torch.testing.assert_close(
            comfy_velocity(model, inputs, sigma),
            diffusers_velocity(pipe, inputs, sigma),
            rtol=1e-4,
            atol=1e-4,
        )
    # Every preset module of the diffusers transformer has a ComfyUI module of the same name and kind.
    comfy_modules = comfy_transformer_modules(model.model.diffusion_model)
    for preset in pipe.act_family.presets:
        names = pipe.act_preset_modules(preset)
        assert set(names) <= set(comfy_modules), preset
        assert all(type(comfy_modules[n]).__name__ == type(m).__name__ for n, m in names.items())


@pytest.mark.parametrize("preset", ["transformer_blocks", "transformer_norms"])
def test_a_diffusers_fitted_qwenimage_map_steers_comfyui_as_diffusers(
    nodes_pack, qwen, qwen_maps, inputs, preset
):
    pipe, model = qwen
    act_map = qwen_maps[preset]
    assert len(act_map.buckets) == 3
    sigma = 0.55  # between two of the map's noise levels: both hosts interpolate the same way
    plain = comfy_velocity(model, inputs, sigma)
    steered_model, _ = nodes_pack["ACTApply"].apply(model, None, act_map, 1.0)
    steered = comfy_velocity(steered_model, inputs, sigma)
    assert set(act_map.modules) <= hooked(model)  # every module of the map is matched and hooked
    # The prompt's rows: ComfyUI's cond rows, diffusers' first call of a step (outside a generation, the gate
    # needs to be told whether the pipeline guides: here it does not, so every row is the prompt's).
    from act_core.diffusers import active_pipeline

    pipe.enable_act(act_map, strength=1.0)
    try:
        with active_pipeline(pipe, cfg_batch=False):
            expected = diffusers_velocity(pipe, inputs, sigma)
    finally:
        pipe.disable_act()
    assert (steered - plain).abs().max() > 1e-3
    torch.testing.assert_close(steered, expected, rtol=1e-4, atol=1e-4)
    # The input MODEL is untouched: loading it again gives the plain output, with no ACT hooks left.
    torch.testing.assert_close(comfy_velocity(model, inputs, sigma), plain, rtol=0, atol=0)
    assert hooked(model) == set()


def fit_qwen(nodes_pack, model, clip, preset="default", **options):
    """The Fit ACT map node on a Qwen-Image MODEL: 4 prompt pairs, 3 steps, cfg 4 with the empty negative.

    The prompts of a pair tokenize to the same length: ComfyUI conditions Qwen-Image with its text tokens'
    positions (no padding mask), and the Fit node makes a batch's lengths equal by repeating the shorter
    conds, which only prompts of one length leave exact."""
    return nodes_pack["ACTFitMap"].fit(
        model,
        clip,
        source_prompts="\n".join(f"a red circle number {i}" for i in range(4)),
        target_prompts="\n".join(f"a blue square number {i}" for i in range(4)),
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


def test_the_fit_node_fits_on_comfyui_qwenimage_and_the_map_steers_ksampler_and_diffusers(
    nodes_pack, qwen, qwen_clip, inputs, caplog
):
    """Fit ACT map samples with ComfyUI's own sampler (ComfyUI's CFG on its Qwen-Image MODEL, ComfyUI's
    Qwen2.5-VL CLIP); the map steers KSampler's output, adds nothing at strength 0, and applies to the
    diffusers transformer with every module matched."""
    pipe, model = qwen
    act_map = fit_qwen(nodes_pack, model, qwen_clip)
    meta = act_map.metadata
    assert (
        meta["family"] == "qwenimage" and meta["host"] == "comfyui" and meta["preset"] == "transformer_blocks"
    )
    assert meta["cfg_rows"] == "cond" and meta["sampling"]["cfg"] == 4.0
    assert len(act_map.buckets) == 3 and len(meta["calibration_gains"]) == 3
    assert set(act_map.modules) == set(pipe.act_preset_modules())  # diffusers' names, all of them

    def sample(patcher):
        return cs.sample_tiny(
            patcher, qwen_clip, "a red circle number 9", seed=3, steps=3, cfg=4.0, size=(8, 8)
        )

    caplog.set_level("INFO", logger="ComfyUI-ACT")
    plain = sample(model)
    at_zero, _ = nodes_pack["ACTApply"].apply(model, qwen_clip, act_map, 0.0)
    caplog.clear()  # strength 0 logs that it leaves the transformer out; strength 1 must hook all of it
    steered, _ = nodes_pack["ACTApply"].apply(model, qwen_clip, act_map, 1.0)
    assert torch.equal(sample(at_zero), plain)
    assert (sample(steered) - plain).abs().max() > 1e-3
    torch.testing.assert_close(sample(model), plain, rtol=0, atol=0)  # the input MODEL is untouched
    assert "ACT applied" in caplog.text and "left out" not in caplog.text  # every map module hooked
    # Portable: the same map steers the diffusers Qwen-Image transformer...
    from act_core.diffusers import active_pipeline

    plain_velocity = diffusers_velocity(pipe, inputs, 0.55)
    pipe.enable_act(act_map, strength=1.0)
    try:
        with active_pipeline(pipe, cfg_batch=False):
            moved = diffusers_velocity(pipe, inputs, 0.55)
    finally:
        pipe.disable_act()
    assert (moved - plain_velocity).abs().max() > 1e-3
    # ... as it steers ComfyUI's model (the prompt's rows of both)
    torch.testing.assert_close(comfy_velocity(steered, inputs, 0.55), moved, rtol=1e-4, atol=1e-4)


def test_wrong_family_maps_other_presets_and_lora_export_are_refused(nodes_pack, qwen, qwen_maps):
    from act_core.errors import ACTInputError, ACTModelMismatchError

    _, model = qwen
    act_map = qwen_maps["transformer_blocks"]
    same, _ = nodes_pack["ACTApply"].apply(model, None, act_map, 0.0)
    assert not same.wrappers and not same.injections
    tiny_sdxl, tiny_clip = cs.build_tiny_sdxl(seed=0)
    with pytest.raises(ACTModelMismatchError, match="Qwen-Image"):
        nodes_pack["ACTApply"].apply(tiny_sdxl, tiny_clip, act_map, 1.0)
    with pytest.raises(ACTInputError, match="LoRA"):
        nodes_pack["ACTExportLoRA"].export(model, None, act_map, "qwen_map", "fp32", False)
    with pytest.raises(ACTInputError, match="not a QWENIMAGE preset.*transformer_blocks"):
        fit_qwen(nodes_pack, model, None, preset="unet_norms")

"""Qwen-Image maps in real ComfyUI (skipped without COMFYUI_PATH): the Fit node fits on ComfyUI's own
Qwen-Image model through ComfyUI's sampler, Apply ACT steers KSampler, and maps move between the hosts with
every module matched, on a ComfyUI model with the diffusers transformer's weights (the same model)."""

from __future__ import annotations

import comfy_family_checks as cfc
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

    base = build_tiny_qwenimage(tmp_path_factory.mktemp("tiny_qwenimage"))
    return cfc.act_pipe_and_comfy_model(base, comfy_qwenimage.load_qwenimage_transformer)


@pytest.fixture(scope="module")
def qwen_clip(comfyui):  # noqa: F811
    import comfy_qwenimage

    return comfy_qwenimage.build_qwenimage_clip(seed=0)


@pytest.fixture(scope="module")
def nodes_pack(comfyui):  # noqa: F811
    return cs.node_callers(cs.load_node_pack())


@pytest.fixture(scope="module")
def qwen_maps(qwen):
    pipe, _ = qwen
    sampling = {
        "num_inference_steps": 3,
        "height": 32,
        "width": 32,
        "guidance_scale": 4.0,
        "negative_prompt": "",
    }
    return cfc.fit_quietly(pipe, SOURCE, TARGET, ("transformer_blocks", "transformer_norms"), **sampling)


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
    return cfc.comfy_velocity(patcher, inputs["x"], sigma, c_crossattn=inputs["context"])


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
    cfc.check_same_model(pipe, model, inputs, comfy_velocity, diffusers_velocity)
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
    # Every module of the map is matched and hooked. The prompt's rows: ComfyUI's cond rows, diffusers' first
    # call of a step (outside a generation, the gate needs to be told whether the pipeline guides: here it
    # does not, so every row is the prompt's).
    cfc.check_a_diffusers_map_steers_comfyui_as_diffusers(
        nodes_pack["ACTApply"].apply,
        pipe,
        model,
        act_map,
        inputs,
        comfy_velocity,
        diffusers_velocity,
        prompt_rows=True,
        hooked=hooked,
        must_hook=act_map.modules,
    )


def fit_qwen(nodes_pack, model, clip, preset="default", **options):
    """The Fit ACT map node on a Qwen-Image MODEL: 4 prompt pairs, 3 steps, cfg 4 with the empty negative.

    The prompts of a pair tokenize to the same length: ComfyUI conditions Qwen-Image with its text tokens'
    positions (no padding mask), and the Fit node makes a batch's lengths equal by repeating the shorter
    conds, which only prompts of one length leave exact."""
    source = [f"a red circle number {i}" for i in range(4)]
    target = [f"a blue square number {i}" for i in range(4)]
    return cfc.fit_node(nodes_pack, model, clip, source, target, preset=preset, cfg=4.0, **options)[0]


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

    def sample(patcher, _clip):  # the transformer map's CLIP is the input one
        return cs.sample_tiny(
            patcher, qwen_clip, "a red circle number 9", seed=3, steps=3, cfg=4.0, size=(8, 8)
        )

    apply = nodes_pack["ACTApply"].apply
    steered = cfc.check_the_map_steers_ksampler(apply, model, qwen_clip, act_map, sample, caplog)
    # Portable: the same map steers the diffusers Qwen-Image transformer...
    moved = cfc.check_a_comfyui_map_steers_diffusers(
        pipe, act_map, inputs, diffusers_velocity, prompt_rows=True
    )
    # ... as it steers ComfyUI's model (the prompt's rows of both)
    torch.testing.assert_close(comfy_velocity(steered, inputs, 0.55), moved, rtol=1e-4, atol=1e-4)


def test_wrong_family_maps_other_presets_and_lora_export_are_refused(nodes_pack, qwen, qwen_maps):
    from act_core.errors import ACTInputError

    _, model = qwen
    act_map = qwen_maps["transformer_blocks"]
    same, _ = nodes_pack["ACTApply"].apply(model, None, act_map, 0.0)
    assert not same.wrappers and not same.injections
    cfc.check_refused_on_sdxl(nodes_pack["ACTApply"].apply, act_map, "Qwen-Image")
    cfc.check_no_lora_export(nodes_pack["ACTExportLoRA"].export, model, act_map, "qwen_map")
    with pytest.raises(ACTInputError, match="not a QWENIMAGE preset.*transformer_blocks"):
        fit_qwen(nodes_pack, model, None, preset="unet_norms")

"""Chroma maps in real ComfyUI: ComfyUI's own Chroma MODEL (``comfy.ldm.chroma.model.Chroma``) with the weights
of a tiny diffusers Chroma transformer is the same model; a map fitted in diffusers steers it exactly as it
steers the diffusers transformer, the Fit node fits on it through ComfyUI's sampler a map that steers KSampler
and applies to the diffusers pipeline, and Chroma and FLUX MODELs are told apart (skipped without
COMFYUI_PATH)."""

from __future__ import annotations

import comfy_family_checks as cfc
import comfy_support as cs  # noqa: E402
import pytest
import torch
from comfy_support import comfyui  # noqa: E402,F401  (session fixture)

pytestmark = cs.requires_comfyui

SOURCE = [f"a red circle number {i}" for i in range(4)]
TARGET = [f"a blue square, striped, number {i}" for i in range(4)]
LATENT = (1, 4, 8, 8)  # 4 latent channels, 2x2 patches: 16 image tokens
PRESETS = ["transformer_blocks", "transformer_norms"]


@pytest.fixture(scope="module")
def chroma(comfyui, tmp_path_factory):  # noqa: F811
    import comfy_chroma

    base = comfy_chroma.build_chroma_pipeline(tmp_path_factory.mktemp("tiny_chroma_comfy"))
    return cfc.act_pipe_and_comfy_model(base, comfy_chroma.load_chroma_transformer)


@pytest.fixture(scope="module")
def chroma_clip(comfyui):  # noqa: F811
    import comfy_chroma

    return comfy_chroma.build_chroma_clip(seed=0)


@pytest.fixture(scope="module")
def nodes_pack(comfyui):  # noqa: F811
    return cs.node_callers(cs.load_node_pack())


def diffusers_fit(pipe, preset, **options):
    from comfy_chroma import MAX_SEQUENCE_LENGTH

    sampling = {
        "num_inference_steps": 3,
        "height": 32,
        "width": 32,
        "guidance_scale": 4.0,
        "max_sequence_length": MAX_SEQUENCE_LENGTH,
    }
    return cfc.fit_quietly(pipe, SOURCE, TARGET, {preset: options}, **sampling)[preset]


@pytest.fixture(scope="module")
def chroma_maps(chroma):
    pipe, _ = chroma
    return {preset: diffusers_fit(pipe, preset) for preset in PRESETS}


@pytest.fixture(scope="module")
def inputs():
    from comfy_chroma import MAX_SEQUENCE_LENGTH

    generator = torch.Generator().manual_seed(0)
    return {
        "x": torch.randn(LATENT, generator=generator),
        "context": torch.randn(1, MAX_SEQUENCE_LENGTH, 32, generator=generator),
    }


def diffusers_velocity(pipe, inputs, sigma: float) -> torch.Tensor:
    """The diffusers transformer's output at noise level ``sigma``, unpacked to ComfyUI's latent layout, every
    row the prompt's (no CFG in this call: the maps steer it, as ComfyUI's cond-only call)."""
    from act_core.diffusers.pipeline import active_pipeline

    with active_pipeline(pipe, cfg_batch=False):
        return cfc.flux_layout_velocity(
            pipe,
            inputs["x"],
            sigma,
            encoder_hidden_states=inputs["context"],
            txt_ids=torch.zeros(inputs["context"].shape[1], 3),
        )


def comfy_velocity(patcher, inputs, sigma: float) -> torch.Tensor:
    """ComfyUI's Chroma output for the same inputs, called as its samplers call it (wrappers, sigmas)."""
    return cfc.comfy_velocity(
        patcher,
        inputs["x"],
        sigma,
        c_crossattn=inputs["context"],
        guidance=torch.tensor([0.0]),  # what ComfyUI's Chroma passes (extra_conds)
    )


def test_comfyui_finds_chroma_and_not_flux_and_names_its_modules_as_diffusers(chroma, tmp_path):
    import comfy_flux
    from tiny_flux import build_tiny_flux

    from act_core.families import FLUX, family_of_comfy_model
    from act_core.families.chroma import CHROMA

    pipe, model = chroma
    diffusion_model = model.model.diffusion_model
    assert type(diffusion_model).__name__ == "Chroma"
    assert family_of_comfy_model(diffusion_model) is CHROMA
    flux = comfy_flux.load_flux_transformer(build_tiny_flux(tmp_path / "flux").transformer)
    assert family_of_comfy_model(flux.model.diffusion_model) is FLUX  # and FLUX is not taken as Chroma
    modules = CHROMA.comfy_denoiser_modules(diffusion_model, None)
    for preset in PRESETS:
        assert set(pipe.act_preset_modules(preset)) <= set(modules)
    assert "transformer.time_text_embed.text_embedder" not in modules  # Chroma has no pooled-text route


def test_comfyui_chroma_is_the_same_model(chroma, inputs):
    pipe, model = chroma
    cfc.check_same_model(pipe, model, inputs, comfy_velocity, diffusers_velocity)


@pytest.mark.parametrize("preset", PRESETS)
def test_a_diffusers_fitted_chroma_map_steers_comfyui_chroma_as_diffusers(
    nodes_pack, chroma, chroma_maps, inputs, preset
):
    pipe, model = chroma
    act_map = chroma_maps[preset]
    assert act_map.metadata["family"] == "chroma" and len(act_map.buckets) == 3
    cfc.check_a_diffusers_map_steers_comfyui_as_diffusers(
        nodes_pack["ACTApply"].apply, pipe, model, act_map, inputs, comfy_velocity, diffusers_velocity
    )


def fit_chroma(nodes_pack, model, clip, preset="default", **options):
    """The Fit ACT map node on a Chroma MODEL: 4 prompt pairs, 3 steps, cfg 4 (Chroma runs real CFG).

    Chroma's T5 does not pad, so these prompts have four token lengths: the node stretches them to the longest
    and says so in its UI text (``nodes/conditioning.common_length``)."""
    out = cfc.fit_node(nodes_pack, model, clip, SOURCE, TARGET, preset=preset, cfg=4.0, **options)
    if isinstance(out, dict):  # a node with warnings shows them in the UI
        assert any("token lengths" in text for text in out["ui"]["text"]), out["ui"]
        out = out["result"]
    return out[0]


def test_the_fit_node_fits_on_comfyui_chroma_and_the_map_steers_ksampler_and_diffusers(
    nodes_pack, chroma, chroma_clip, inputs, caplog
):
    """Fit ACT map samples with ComfyUI's own sampler on its Chroma MODEL; the map has diffusers' names,
    steers KSampler's output (strength 0 exactly the plain output), and applies to the diffusers transformer."""
    pipe, model = chroma
    act_map = fit_chroma(nodes_pack, model, chroma_clip)
    meta = act_map.metadata
    assert meta["family"] == "chroma" and meta["host"] == "comfyui" and meta["preset"] == "transformer_blocks"
    assert meta["cfg_rows"] == "cond" and len(act_map.buckets) == 3
    assert set(act_map.modules) == set(pipe.act_preset_modules("transformer_blocks"))

    def sample(patcher, _clip):  # the transformer map's CLIP is the input one
        return cs.sample_tiny(
            patcher, chroma_clip, "a red circle number 9", seed=3, steps=3, cfg=4.0, size=(8, 8)
        )

    apply = nodes_pack["ACTApply"].apply
    cfc.check_the_map_steers_ksampler(apply, model, chroma_clip, act_map, sample, caplog)
    # Portable: the ComfyUI-fitted map steers the diffusers Chroma transformer, every module matched.
    cfc.check_a_comfyui_map_steers_diffusers(pipe, act_map, inputs, diffusers_velocity)


def test_chroma_text_encoder_maps_are_portable_both_ways(nodes_pack, chroma, chroma_clip, caplog):
    """A ``text_encoder_norms`` map fitted in diffusers hooks every T5 norm of ComfyUI's Chroma CLIP and
    steers its conditioning; the Fit node's text-encoder map has diffusers' names and applies there."""
    pipe, model = chroma
    diffusers_map = diffusers_fit(pipe, "text_encoder_norms", support="unbounded")
    comfy_map = fit_chroma(nodes_pack, model, chroma_clip, preset="text_encoder_norms")
    assert comfy_map.parts() == ["text_encoder"] == diffusers_map.parts()
    assert (
        set(comfy_map.modules)
        == set(diffusers_map.modules)
        == set(pipe.act_preset_modules("text_encoder_norms"))
    )
    plain = cs.encode(chroma_clip, "a red circle number 9")[0][0]
    caplog.set_level("INFO", logger="ComfyUI-ACT")
    for act_map in (diffusers_map, comfy_map):
        caplog.clear()
        _, steered = nodes_pack["ACTApply"].apply(None, chroma_clip, act_map, 0.0, True, 1.0)
        assert (cs.encode(steered, "a red circle number 9")[0][0] - plain).abs().max() > 1e-3
        assert "left out" not in caplog.text
    pipe.enable_act(comfy_map, strength=1.0)  # diffusers takes the ComfyUI-fitted map: every module matches
    pipe.disable_act()


def test_flux_and_chroma_maps_are_refused_on_each_other(nodes_pack, chroma, chroma_maps, tmp_path):
    import comfy_flux
    from tiny_flux import build_tiny_flux

    from act_core.errors import ACTModelMismatchError
    from act_core.families.flux import FLUX

    _, model = chroma
    chroma_map = chroma_maps["transformer_blocks"]
    flux = comfy_flux.load_flux_transformer(build_tiny_flux(tmp_path / "flux").transformer)
    with pytest.raises(ACTModelMismatchError, match="Chroma model.*this MODEL is FLUX"):
        nodes_pack["ACTApply"].apply(flux, None, chroma_map, 1.0)
    # A FLUX map (its metadata: the same module names as a Chroma map's blocks) is refused on Chroma.
    flux_map = chroma_map.with_metadata({"family": FLUX.name})
    with pytest.raises(ACTModelMismatchError, match="FLUX.1 model.*this MODEL is Chroma"):
        nodes_pack["ACTApply"].apply(model, None, flux_map, 1.0)
    cfc.check_no_lora_export(nodes_pack["ACTExportLoRA"].export, model, chroma_map, "chroma_map")

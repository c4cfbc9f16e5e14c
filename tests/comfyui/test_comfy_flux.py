"""FLUX maps in real ComfyUI: a map fitted in diffusers steers ComfyUI's own FLUX model exactly as it steers
the diffusers transformer (skipped without COMFYUI_PATH)."""

from __future__ import annotations

import comfy_family_checks as cfc
import comfy_support as cs  # noqa: E402
import pytest
import torch
from comfy_support import comfyui  # noqa: E402,F401  (session fixture)
from tiny_flux import MAX_SEQUENCE_LENGTH, build_tiny_flux

pytestmark = cs.requires_comfyui

SOURCE = [f"a red circle number {i}" for i in range(6)]
TARGET = [f"a blue square, striped, number {i}" for i in range(6)]
LATENT = (1, 4, 8, 8)  # ComfyUI's FLUX latent (4 channels for the tiny VAE), 2x2 patches: 16 image tokens


@pytest.fixture(scope="module")
def flux(comfyui, tmp_path_factory):  # noqa: F811
    import comfy_flux

    base = build_tiny_flux(tmp_path_factory.mktemp("tiny_flux"))
    return cfc.act_pipe_and_comfy_model(base, comfy_flux.load_flux_transformer)


@pytest.fixture(scope="module")
def flux_maps(flux):
    pipe, _ = flux
    sampling = {
        "num_inference_steps": 3,
        "height": 32,
        "width": 32,
        "max_sequence_length": MAX_SEQUENCE_LENGTH,
    }
    presets = ("pooled_text_and_blocks", "transformer_blocks", "transformer_norms")
    return cfc.fit_quietly(pipe, SOURCE, TARGET, presets, **sampling)


@pytest.fixture(scope="module")
def inputs():
    generator = torch.Generator().manual_seed(0)
    return {
        "x": torch.randn(LATENT, generator=generator),
        "context": torch.randn(1, MAX_SEQUENCE_LENGTH, 32, generator=generator),
        "pooled": torch.randn(1, 32, generator=generator),
    }


def diffusers_velocity(pipe, inputs, sigma: float) -> torch.Tensor:
    """The diffusers transformer's output at noise level ``sigma``, unpacked to ComfyUI's latent layout."""
    return cfc.flux_layout_velocity(
        pipe,
        inputs["x"],
        sigma,
        pooled_projections=inputs["pooled"],
        encoder_hidden_states=inputs["context"],
        txt_ids=torch.zeros(MAX_SEQUENCE_LENGTH, 3),
    )


def comfy_velocity(patcher, inputs, sigma: float) -> torch.Tensor:
    """ComfyUI's FLUX output for the same inputs, called as its samplers call it (wrappers, sigmas)."""
    return cfc.comfy_velocity(patcher, inputs["x"], sigma, c_crossattn=inputs["context"], y=inputs["pooled"])


def test_comfyui_flux_is_the_same_model(flux, inputs):
    pipe, model = flux
    cfc.check_same_model(pipe, model, inputs, comfy_velocity, diffusers_velocity)


@pytest.mark.parametrize("preset", ["pooled_text_and_blocks", "transformer_blocks", "transformer_norms"])
def test_a_diffusers_fitted_flux_map_steers_comfyui_flux_as_diffusers(
    nodes_pack, flux, flux_maps, inputs, preset
):
    pipe, model = flux
    act_map = flux_maps[preset]
    assert len(act_map.buckets) == 3
    cfc.check_a_diffusers_map_steers_comfyui_as_diffusers(
        nodes_pack["ACTApply"].apply, pipe, model, act_map, inputs, comfy_velocity, diffusers_velocity
    )


def test_strength_zero_adds_nothing_and_wrong_family_maps_are_refused(
    nodes_pack, flux, flux_maps, flux_text_map
):
    from act_core.errors import ACTInputError, ACTModelMismatchError

    _, model = flux
    act_map = flux_maps["pooled_text_and_blocks"]
    same, _ = nodes_pack["ACTApply"].apply(model, None, act_map, 0.0)
    assert not same.wrappers and not same.injections
    tiny_sdxl, tiny_clip = cs.build_tiny_sdxl(seed=0)
    with pytest.raises(ACTModelMismatchError, match="transformer"):
        nodes_pack["ACTApply"].apply(tiny_sdxl, tiny_clip, act_map, 1.0)
    with pytest.raises(ACTModelMismatchError, match="does not fit this CLIP"):  # not a FLUX CLIP: no T5
        nodes_pack["ACTApply"].apply(None, tiny_clip, flux_text_map, 1.0)
    cfc.check_no_lora_export(nodes_pack["ACTExportLoRA"].export, model, act_map, "flux_map")
    with pytest.raises(ACTInputError, match="not a FLUX preset.*pooled_text_and_blocks"):
        fit_flux(nodes_pack, model, None, preset="unet_norms")


def fit_flux(nodes_pack, model, clip, preset="pooled_text_and_blocks", **options):
    """The Fit ACT map node on a FLUX MODEL: 4 prompt pairs, 3 steps, cfg 1 (FLUX.1 runs no CFG batch)."""
    return cfc.fit_node(nodes_pack, model, clip, SOURCE[:4], TARGET[:4], preset=preset, cfg=1.0, **options)[0]


@pytest.fixture(scope="module")
def flux_clip(comfyui):  # noqa: F811
    import comfy_flux

    return comfy_flux.build_flux_clip(seed=0)


@pytest.mark.parametrize("preset", ["default", "transformer_norms"])
def test_the_fit_node_fits_on_comfyui_flux_and_the_map_steers_ksampler_and_diffusers(
    nodes_pack, flux, flux_clip, inputs, preset, caplog
):
    """Fit ACT map samples with ComfyUI's own sampler on its FLUX MODEL; the map steers KSampler's output,
    adds nothing at strength 0, and applies to the diffusers transformer with every module matched."""
    pipe, model = flux
    act_map = fit_flux(nodes_pack, model, flux_clip, preset=preset)
    assert act_map.metadata["family"] == "flux" and act_map.metadata["host"] == "comfyui"
    assert len(act_map.buckets) == 3 and len(act_map.metadata["calibration_gains"]) == 3
    resolved = "pooled_text_and_blocks" if preset == "default" else preset  # "default": FLUX's own default
    assert act_map.metadata["preset"] == resolved
    assert set(act_map.modules) == set(pipe.act_preset_modules(resolved))  # diffusers' names, all of them

    def sample(patcher, _clip):  # the transformer map's CLIP is the input one
        return cs.sample_tiny(
            patcher, flux_clip, "a red circle number 9", seed=3, steps=3, cfg=1.0, size=(8, 8)
        )

    cfc.check_the_map_steers_ksampler(nodes_pack["ACTApply"].apply, model, flux_clip, act_map, sample, caplog)
    # Portable: the same map steers the diffusers FLUX transformer.
    cfc.check_a_comfyui_map_steers_diffusers(pipe, act_map, inputs, diffusers_velocity)


@pytest.fixture(scope="module")
def nodes_pack(comfyui):  # noqa: F811
    return cs.node_callers(cs.load_node_pack())


@pytest.fixture(scope="module")
def flux_text_map(flux):
    pipe, _ = flux
    presets = {"text_encoder_norms": {"support": "unbounded"}}
    maps = cfc.fit_quietly(pipe, SOURCE, TARGET, presets, max_sequence_length=MAX_SEQUENCE_LENGTH)
    return maps["text_encoder_norms"]


def test_a_diffusers_fitted_flux_text_encoder_map_steers_comfyui_flux_clip_as_diffusers(
    nodes_pack, flux, flux_text_map, caplog
):
    """A ``text_encoder_norms`` map fitted on the diffusers FluxPipeline applies to ComfyUI's FLUX CLIP
    (CLIP-L and T5) with its own text-encoder strength, every module hooked.

    The tiny hosts do not encode the same tokens (the diffusers pipeline has the tests' character
    tokenizer, ComfyUI its real CLIP / T5 tokenizers and vocabularies), so the two hosts' conditionings
    cannot be compared; instead each hooked module's output transform is: the same input through the
    module in both hosts, the norm weights being the same (``comfy_flux.flux_clip_like``)."""
    import comfy.model_management as mm
    import comfy_flux

    from act_core.families.flux import comfy_clip_modules, component_modules

    pipe, _ = flux
    act_map = flux_text_map
    assert act_map.metadata["family"] == "flux" and act_map.parts() == ["text_encoder", "text_encoder_2"]
    assert any(n.startswith("text_encoder.text_model.encoder.layers.") for n in act_map.modules)
    assert "text_encoder_2.encoder.block.0.layer.0.layer_norm" in act_map.modules
    assert "text_encoder_2.encoder.final_layer_norm" in act_map.modules
    clip = comfy_flux.flux_clip_like(pipe)
    comfy_modules = comfy_clip_modules(clip.cond_stage_model)
    # ComfyUI's module of each canonical name, spelled out here independently of the family's name map.
    encoders = {"text_encoder": "clip_l", "text_encoder_2": "t5xxl"}
    comfy_paths = {
        name: f"{encoders[name.partition('.')[0]]}.transformer.{name.partition('.')[2]}"
        for name in act_map.modules
    }
    assert all(
        comfy_modules[name] is clip.cond_stage_model.get_submodule(path) for name, path in comfy_paths.items()
    )
    diffusers_modules = {
        **component_modules("text_encoder", pipe.text_encoder),
        **component_modules("text_encoder_2", pipe.text_encoder_2),
    }
    prompt = "a red circle number 9"
    apply = nodes_pack["ACTApply"].apply

    def conditioning(clip):
        ((cond, extra),) = cs.encode(clip, prompt)
        return cond, extra["pooled_output"]

    def hooked():
        return {n for n, m in comfy_modules.items() if hasattr(m, "_act_handle")}

    plain = conditioning(clip)
    # Strength 0 (or text-encoder strength 0) adds nothing at all: no injection, the plain conditioning.
    _, at_zero = apply(None, clip, act_map, 0.0)
    _, te_zero = apply(None, clip, act_map, 1.0, True, 0.0)
    for same in (at_zero, te_zero):
        assert not same.patcher.injections
        for got, want in zip(conditioning(same), plain, strict=True):
            assert torch.equal(got, want)
    # Text-encoder strength 1 (strength 0: the map has no transformer part anyway) hooks every map module.
    caplog.set_level("INFO", logger="ComfyUI-ACT")
    caplog.clear()
    _, steered = apply(None, clip, act_map, 0.0, True, 1.0)
    steered_cond = conditioning(steered)
    assert hooked() == set(act_map.modules)
    assert "left out" not in caplog.text
    for got, want in zip(steered_cond, plain, strict=True):  # T5's tokens and CLIP-L's pooled vector
        assert (got - want).abs().max() > 1e-3

    # Each module's output transform, the same input through both hosts' module with the map applied.
    generator = torch.Generator().manual_seed(0)
    inputs = {name: torch.randn(2, 5, 32, generator=generator) for name in act_map.modules}
    with torch.no_grad():
        mm.load_models_gpu([clip.patcher])  # the plain CLIP: no ACT hooks
        assert hooked() == set()
        comfy_plain = {name: comfy_modules[name](x) for name, x in inputs.items()}
        mm.load_models_gpu([steered.patcher])
        assert hooked() == set(act_map.modules)
        comfy_steered = {name: comfy_modules[name](x) for name, x in inputs.items()}
        diffusers_plain = {name: diffusers_modules[name](x) for name, x in inputs.items()}
        pipe.enable_act(act_map, strength=1.0)
        try:
            diffusers_steered = {name: diffusers_modules[name](x) for name, x in inputs.items()}
        finally:
            pipe.disable_act()
    for name in act_map.modules:
        torch.testing.assert_close(comfy_plain[name], diffusers_plain[name], rtol=1e-5, atol=1e-5)
        assert (diffusers_steered[name] - diffusers_plain[name]).abs().max() > 1e-3, name
        torch.testing.assert_close(comfy_steered[name], diffusers_steered[name], rtol=1e-5, atol=1e-5)
    # The input CLIP is untouched: loaded again, it encodes the plain conditioning with no hooks left.
    for got, want in zip(conditioning(clip), plain, strict=True):
        assert torch.equal(got, want)
    assert hooked() == set()


def test_the_fit_node_fits_a_flux_text_encoder_map_on_comfyui_flux_clip(nodes_pack, flux, caplog):
    """Fit ACT map with a text-encoder preset on a FLUX MODEL + FLUX CLIP records ComfyUI's CLIP-L and T5
    under diffusers' names (so the map also applies to the diffusers pipeline), and Apply ACT steers the
    conditioning with it at its own text-encoder strength."""
    import comfy_flux

    pipe, model = flux
    clip = comfy_flux.flux_clip_like(pipe)
    act_map = fit_flux(nodes_pack, model, clip, preset="text_encoder_norms")
    assert act_map.metadata["family"] == "flux" and act_map.metadata["host"] == "comfyui"
    assert act_map.parts() == ["text_encoder", "text_encoder_2"]
    assert set(act_map.modules) == set(pipe.act_preset_modules("text_encoder_norms"))
    plain = cs.encode(clip, "a red circle number 9")[0]
    caplog.set_level("INFO", logger="ComfyUI-ACT")
    caplog.clear()
    _, steered = nodes_pack["ACTApply"].apply(None, clip, act_map, 0.0, True, 1.0)
    (cond, extra) = cs.encode(steered, "a red circle number 9")[0]
    assert (cond - plain[0]).abs().max() > 1e-3
    assert (extra["pooled_output"] - plain[1]["pooled_output"]).abs().max() > 1e-3
    assert "left out" not in caplog.text
    pipe.enable_act(act_map, strength=1.0)  # diffusers takes the ComfyUI-fitted map: every module matches
    pipe.disable_act()


def test_a_map_of_a_family_without_comfyui_support_is_refused_with_the_reason(
    nodes_pack, tmp_path, monkeypatch
):
    """A map whose family has no ComfyUI fields (steered in diffusers only): Apply ACT says so instead of
    matching wrong modules. (SD3 maps used to be refused so; SD3 now applies: tests/comfyui/test_comfy_sd3.py.)"""
    import dataclasses

    from tiny_sd3 import build_tiny_sd3

    from act_core import families
    from act_core.diffusers import act_pipeline
    from act_core.errors import ACTModelMismatchError

    sd3 = act_pipeline(build_tiny_sd3(tmp_path / "sd3"))
    with pytest.warns(Warning):  # the tests' tokenizer does not know these words
        sd3_map = sd3.fit_act(
            SOURCE[:2],
            TARGET[:2],
            num_inference_steps=2,
            height=32,
            width=32,
            max_sequence_length=16,
            progress=False,
        )
    diffusers_only = dataclasses.replace(
        families.SD3,
        name="diffusers_only",
        display_name="Diffusers-only",
        comfy_denoisers=(),
        comfy_denoiser_modules=None,
        comfy_clip_modules=None,
        comfy_clip_parts={},
    )
    assert diffusers_only.hosts == ("diffusers",)
    monkeypatch.setitem(families.FAMILIES, diffusers_only.name, diffusers_only)
    act_map = sd3_map.with_metadata({"family": diffusers_only.name})
    tiny_sdxl, tiny_clip = cs.build_tiny_sdxl(seed=0)
    with pytest.raises(ACTModelMismatchError, match="Diffusers-only models.*diffusers only"):
        nodes_pack["ACTApply"].apply(tiny_sdxl, tiny_clip, act_map, 1.0)
    # The SD3 map itself is an SD3 map: refused on this SDXL MODEL for being fitted on another family.
    with pytest.raises(ACTModelMismatchError, match="SD3 model.*this MODEL is SDXL"):
        nodes_pack["ACTApply"].apply(tiny_sdxl, tiny_clip, sd3_map, 1.0)


def test_the_fit_node_split_into_calls_of_one_pair_gives_the_one_call_map(nodes_pack, flux, flux_clip):
    """max_pairs_per_call=1: the source rows of each step run in calls that meet at every hooked module,
    and the map equals the fit whose calls hold every pair (issue 19)."""
    _, model = flux
    whole = fit_flux(nodes_pack, model, flux_clip)
    split = fit_flux(nodes_pack, model, flux_clip, max_pairs_per_call=1)
    assert whole.metadata["pairs_per_call"] == 4 and split.metadata["pairs_per_call"] == 1
    assert split.metadata["causal_strategy"] == "exact"
    cfc.check_same_maps(split, whole)

"""SD 1.5 (and SD 2.x) in real ComfyUI, served by the SDXL family: ComfyUI's own SD15 / SD20 model
(``model_base.BaseModel`` over the UNetModel class SDXL uses) with the weights of a tiny diffusers UNet, and
ComfyUI's SD1 CLIP (``clip_l`` alone) tiny. The Fit node fits through ComfyUI's sampler, Apply ACT steers
KSampler, a foldable map exported as a LoRA is loaded whole by the stock LoraLoader (UNet and clip_l keys),
and maps move between the hosts with every module matched (skipped without COMFYUI_PATH)."""

from __future__ import annotations

import importlib
import logging

import comfy_family_checks as cfc
import comfy_support as cs  # noqa: E402
import pytest
import torch
from comfy_support import comfyui  # noqa: E402,F401  (session fixture)

pytestmark = cs.requires_comfyui

SOURCE = [f"a photo of a {thing}" for thing in ("cat", "dog", "house", "tree")]
TARGET = [f"a watercolor painting of a {thing}" for thing in ("cat", "dog", "house", "tree")]
SIGMA = 2.0  # a noise level between the fitted ones: both hosts interpolate the maps the same way


@pytest.fixture(scope="module")
def pack(comfyui):  # noqa: F811
    return cs.load_node_pack()


@pytest.fixture(scope="module")
def nodes(pack):
    return cs.node_callers(pack)


def _mod(pack, name):
    return importlib.import_module(f"{pack.__name__}.nodes.{name}")


@pytest.fixture(scope="module")
def sd15(comfyui, tmp_path_factory):  # noqa: F811
    """(ACT diffusers pipeline, ComfyUI MODEL with its UNet's weights)."""
    from tiny_sd15 import build_tiny_sd15, load_comfy_unet

    base = build_tiny_sd15(tmp_path_factory.mktemp("tiny_sd15_comfy"))
    return cfc.act_pipe_and_comfy_model(base, load_comfy_unet, denoiser="unet")


@pytest.fixture(scope="module")
def clip(comfyui):  # noqa: F811
    from tiny_sd15 import build_comfy_sd1_clip

    return build_comfy_sd1_clip(seed=0)


@pytest.fixture(scope="module")
def diffusers_maps(sd15):
    pipe, _ = sd15
    presets = {"unet_norms": {}, "unet_norms_foldable": {}, "text_encoder_norms": {"support": "unbounded"}}
    return cfc.fit_quietly(pipe, SOURCE, TARGET, presets, num_inference_steps=3, height=32, width=32)


@pytest.fixture()
def folders(tmp_path, monkeypatch, pack):
    """act_maps and loras in temporary folders (ComfyUI's folder_paths, in-process)."""
    import folder_paths

    act_maps, loras = tmp_path / "act_maps", tmp_path / "loras"
    act_maps.mkdir()
    loras.mkdir()
    table = dict(folder_paths.folder_names_and_paths)
    table["act_maps"] = ([str(act_maps)], {".safetensors"})
    table["loras"] = ([str(loras)], set(folder_paths.supported_pt_extensions))
    monkeypatch.setattr(folder_paths, "folder_names_and_paths", table)
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    return act_maps, loras


def fit_node(nodes, model, clip, preset="default", **options):
    """The Fit ACT map node on the SD 1.5 MODEL: 4 prompt pairs, 3 euler steps, cfg 5."""
    options = {"width": 128, "height": 128, "cfg": 5.0, **options}
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        return cfc.fit_node(nodes, model, clip, SOURCE, TARGET, preset=preset, **options)[0]


def inputs():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(1, 4, 16, 16, generator=generator), torch.randn(1, 77, 32, generator=generator)


def comfy_eps(patcher, x, context, sigma: float) -> torch.Tensor:
    """ComfyUI's UNet prediction (eps) at ``sigma``, called as its samplers call it (cond rows only)."""
    return cfc.comfy_velocity(patcher, x, sigma, c_crossattn=context)


def diffusers_eps(pipe, patcher, x, context, sigma: float) -> torch.Tensor:
    """The diffusers UNet's prediction for the same call: ComfyUI's scaled input and timestep."""
    from act_core.diffusers.pipeline import active_pipeline

    sampling = patcher.model.model_sampling
    t = sampling.timestep(torch.tensor([sigma])).float()
    scaled = x / (sigma**2 + 1) ** 0.5  # ComfyUI's EPS input scaling (calculate_input)
    with torch.no_grad(), active_pipeline(pipe, cfg_batch=False):
        return pipe.unet(scaled, t, encoder_hidden_states=context, return_dict=False)[0]


def test_comfyui_sd15_is_the_sdxl_family_with_diffusers_names(sd15, pack):
    from act_core.families import SDXL, family_of_comfy_model

    pipe, model = sd15
    diffusion_model = model.model.diffusion_model
    assert type(model.model).__name__ == "BaseModel" and type(diffusion_model).__name__ == "UNetModel"
    assert family_of_comfy_model(diffusion_model) is SDXL
    modules = _mod(pack, "comfy_models").denoiser_modules(model, SDXL)
    diffusers = pipe.act_modules(["unet"])
    for preset in ("unet_norms", "unet_norms_foldable"):
        names = set(pipe.act_preset_modules(preset))
        assert names <= set(modules)
        for name in names:  # the same module kind and width in both hosts
            assert isinstance(modules[name], type(diffusers[name]))
            assert modules[name].weight.shape == diffusers[name].weight.shape
    x, context = inputs()
    torch.testing.assert_close(
        comfy_eps(model, x, context, SIGMA),
        diffusers_eps(pipe, model, x, context, SIGMA),
        rtol=1e-4,
        atol=1e-4,
    )


@pytest.mark.parametrize("preset", ["unet_norms", "unet_norms_foldable"])
def test_a_diffusers_fitted_sd15_map_steers_comfyui_as_diffusers(nodes, sd15, diffusers_maps, caplog, preset):
    pipe, model = sd15
    act_map = diffusers_maps[preset]
    x, context = inputs()
    plain = comfy_eps(model, x, context, SIGMA)
    caplog.set_level("INFO", logger="ComfyUI-ACT")
    steered_model, _ = nodes["ACTApply"].apply(model, None, act_map, 1.0)
    assert "ACT applied" in caplog.text and "left out" not in caplog.text
    steered = comfy_eps(steered_model, x, context, SIGMA)
    pipe.enable_act(act_map, strength=1.0)
    try:
        expected = diffusers_eps(pipe, model, x, context, SIGMA)
    finally:
        pipe.disable_act()
    assert (steered - plain).abs().max() > 1e-3
    torch.testing.assert_close(steered, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(comfy_eps(model, x, context, SIGMA), plain, rtol=0, atol=0)


def test_the_fit_node_fits_sd15_through_comfyuis_sampler_and_the_map_steers_ksampler_and_diffusers(
    nodes, sd15, clip
):
    pipe, model = sd15
    act_map = fit_node(nodes, model, clip)
    meta = act_map.metadata
    assert meta["family"] == "sdxl" and meta["host"] == "comfyui" and meta["preset"] == "unet_norms"
    assert meta["cfg_rows"] == "cond" and len(act_map.buckets) == 3  # one per sampler step
    assert set(act_map.modules) == set(pipe.act_preset_modules("unet_norms"))

    def sample(patcher, c):
        return cs.sample_tiny(patcher, c, "a photo of a lamp", seed=3, steps=3, cfg=5.0)

    cfc.check_the_map_steers_ksampler(nodes["ACTApply"].apply, model, clip, act_map, sample)

    # the ComfyUI-fitted map steers the diffusers UNet, every module matched
    def eps(pipe, x_and_context, sigma):
        return diffusers_eps(pipe, model, *x_and_context, sigma)

    cfc.check_a_comfyui_map_steers_diffusers(pipe, act_map, inputs(), eps, sigma=SIGMA)


def test_text_encoder_presets_fit_sd1s_one_clip(nodes, sd15, clip, diffusers_maps):
    """SDXL's text-encoder presets name clip_g too; ComfyUI's SD1 CLIP has clip_l alone, which the preset fits
    (every layer and the final LayerNorm: SD 1.x reads the last layer's normalised output). A diffusers map
    of the same encoder applies to it with every module matched."""
    _, model = sd15
    text = fit_node(nodes, model, clip, preset="text_encoder_norms", support="unbounded", mode="causal")
    assert text.parts() == ["text_encoder"]
    assert set(text.modules) == set(diffusers_maps["text_encoder_norms"].modules)
    assert "text_encoder.text_model.final_layer_norm" in text.modules
    base = cs.sample_tiny(model, clip, "a photo of a lamp", seed=3)
    for act_map in (text, diffusers_maps["text_encoder_norms"]):
        _, steered_clip = nodes["ACTApply"].apply(model, clip, act_map, 1.0)
        assert (cs.sample_tiny(model, steered_clip, "a photo of a lamp", seed=3) - base).abs().max() > 1e-3


def lora_report(model, clip, path):
    """(file keys no ComfyUI key map entry reads, model patch count, clip patch count) of a LoRA file, as
    ``comfy.sd.load_lora_for_models`` maps it (the LoraLoader's own code)."""
    import comfy.lora
    import comfy.utils

    lora = comfy.utils.load_torch_file(str(path), safe_load=True)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    unread = [key for key in lora if key.rsplit(".", 1)[0] not in key_map]
    return unread, lora


@pytest.mark.parametrize("source", ["comfyui", "diffusers"])
def test_a_foldable_map_exported_as_lora_loads_every_key_in_the_stock_loraloader(
    nodes, sd15, clip, diffusers_maps, folders, pack, caplog, source
):
    """UNet norms and clip_l norms, exported by the Export node (or by diffusers' export_lora on the twin
    UNet), loaded by LoraLoader: no key left unloaded, one patch per diff, and the sample is Apply ACT's."""
    from safetensors import safe_open

    import nodes as comfy_nodes
    from act_core.lora import export_lora
    from act_core.maps import ACTMap

    pipe, model = sd15
    _, loras = folders
    if source == "comfyui":
        unet = fit_node(nodes, model, clip, preset="unet_norms_foldable", mode="causal")
        text = fit_node(nodes, model, clip, preset="text_encoder_norms", support="unbounded", mode="causal")
    else:
        unet, text = diffusers_maps["unet_norms_foldable"], diffusers_maps["text_encoder_norms"]
    both = ACTMap({**unet.modules, **text.modules}, {"method": "linear", "family": "sdxl"})
    name = f"act/sd15_{source}.safetensors"
    if source == "comfyui":
        out = nodes["ACTExportLoRA"].export(
            model, clip, both, name.removesuffix(".safetensors"), "fp32", False
        )
        assert out["result"] == (name,)
    else:
        (loras / "act").mkdir()
        export_lora(both, pipe, loras / name, strength=1.0, dtype="fp32")
    with safe_open(str(loras / name), "pt") as f:
        keys = set(f.keys())
    assert len(keys) == 2 * len(both)  # every norm has a weight and a bias
    # both hosts name UNet modules as the original checkpoint does (kohya's key, which A1111 and Forge read too)
    assert "lora_unet_out_0.diff" in keys
    assert "text_encoders.clip_l.transformer.text_model.final_layer_norm.diff_b" in keys

    unread, _ = lora_report(model, clip, loras / name)
    assert unread == []
    lam = 0.7
    with caplog.at_level(logging.WARNING):
        lora_model, lora_clip = comfy_nodes.LoraLoader().load_lora(model, clip, name, lam, lam)
    assert not [r for r in caplog.records if "not loaded" in r.getMessage().lower()]
    assert len(lora_model.patches) == 2 * len(unet)
    assert len(lora_clip.patcher.patches) == 2 * len(text)

    if source == "comfyui":  # the same sample as Apply ACT's weight patches at lambda
        act_model, act_clip = nodes["ACTApply"].apply(model, clip, both, lam)
        via_lora = cs.sample_tiny(lora_model, lora_clip, "a photo of a lamp", seed=4)
        via_act = cs.sample_tiny(act_model, act_clip, "a photo of a lamp", seed=4)
        base = cs.sample_tiny(model, clip, "a photo of a lamp", seed=4)
        scale = float((via_act - base).abs().max())
        assert scale > 1e-2
        torch.testing.assert_close(via_lora, via_act, rtol=1e-4, atol=1e-4 * scale)


def test_lora_unet_names_are_comfyuis_for_real_sdxl_and_sd15_unets(comfyui):  # noqa: F811
    """The original-layout names LoRA export gives a diffusers UNet's modules (``lora_unet_<LDM path>``) are
    ComfyUI's for every parameter of the real SDXL and SD 1.5 UNets (meta tensors: nothing allocated), as
    ComfyUI's model detection and ``unet_to_diffusers`` name them, two layers per level as in those models."""
    import sys
    from pathlib import Path

    import comfy.model_detection
    import comfy.utils
    from diffusers import UNet2DConditionModel

    from act_core.families.sdxl import ldm_key_table

    benchmarks = str(Path(__file__).resolve().parents[2] / "benchmarks")
    sys.path.insert(0, benchmarks)
    try:
        from bench_sdxl import SDXL_UNET
    finally:
        sys.path.remove(benchmarks)
    sd15 = dict(cross_attention_dim=768)  # diffusers' defaults are SD 1.x's UNet otherwise
    for config in (SDXL_UNET, sd15):
        with torch.device("meta"):
            unet = UNet2DConditionModel(**config)
        comfy_config = comfy.model_detection.unet_config_from_diffusers_unet(unet.state_dict())
        comfy_table = comfy.utils.unet_to_diffusers(comfy_config)
        ours = ldm_key_table(unet)
        assert set(ours) == {key for key, _ in unet.named_parameters()}
        assert ours == {key: comfy_table[key] for key in ours}


def test_sd2_in_comfyui_steers_the_unet_as_diffusers_and_loads_its_lora(nodes, folders, tmp_path_factory):
    """SD 2.x: ComfyUI's SD20 model (linear projections, 64-wide heads shrunk, v-prediction) with a tiny
    diffusers SD 2.x UNet's weights: a diffusers UNet map steers it as diffusers, and its foldable map's LoRA
    loads whole."""
    import comfy.model_base
    import comfy.utils
    from tiny_sd15 import build_tiny_sd2, load_comfy_unet

    import nodes as comfy_nodes
    from act_core.lora import export_lora

    base = build_tiny_sd2(tmp_path_factory.mktemp("tiny_sd2_comfy"))
    pipe, model = cfc.act_pipe_and_comfy_model(base, load_comfy_unet, denoiser="unet")
    assert model.model.model_type == comfy.model_base.ModelType.V_PREDICTION
    maps = cfc.fit_quietly(pipe, SOURCE, TARGET, ("unet_norms", "unet_norms_foldable"), num_inference_steps=3)
    x, context = inputs()
    # v-prediction: compare the raw UNet call (ComfyUI's diffusion_model) at one timestep
    plain = model.model.diffusion_model(x, timesteps=torch.tensor([500.0]), context=context)
    steered_model, _ = nodes["ACTApply"].apply(model, None, maps["unet_norms"], 1.0)
    steered = comfy_eps(steered_model, x, context, SIGMA)
    pipe.enable_act(maps["unet_norms"], strength=1.0)
    try:
        expected = v_as_eps(pipe, model, x, context, SIGMA)
    finally:
        pipe.disable_act()
    torch.testing.assert_close(steered, expected, rtol=1e-4, atol=1e-4)
    assert (steered - comfy_eps(model, x, context, SIGMA)).abs().max() > 1e-3
    with torch.no_grad():
        torch.testing.assert_close(
            pipe.unet(x, torch.tensor([500.0]), encoder_hidden_states=context).sample,
            plain,
            rtol=1e-4,
            atol=1e-4,
        )
    _, loras = folders
    export_lora(maps["unet_norms_foldable"], pipe, loras / "sd2.safetensors", strength=1.0, dtype="fp32")
    lora = comfy.utils.load_torch_file(str(loras / "sd2.safetensors"), safe_load=True)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    assert [key for key in lora if key.rsplit(".", 1)[0] not in key_map] == []
    lora_model, _ = comfy_nodes.LoraLoader().load_lora(model, None, "sd2.safetensors", 1.0, 0.0)
    assert len(lora_model.patches) == len(lora)


def v_as_eps(pipe, patcher, x, context, sigma: float) -> torch.Tensor:
    """The diffusers v-prediction UNet's output for ComfyUI's call, as the eps ComfyUI's V_PREDICTION model
    derives from it (denoised = x / (sigma^2 + 1) - v sigma / sqrt(sigma^2 + 1))."""
    from act_core.diffusers.pipeline import active_pipeline

    t = patcher.model.model_sampling.timestep(torch.tensor([sigma])).float()
    scaled = x / (sigma**2 + 1) ** 0.5
    with torch.no_grad(), active_pipeline(pipe, cfg_batch=False):
        v = pipe.unet(scaled, t, encoder_hidden_states=context, return_dict=False)[0]
    denoised = x / (sigma**2 + 1) - v * sigma / (sigma**2 + 1) ** 0.5
    return (x - denoised) / sigma


def test_the_default_map_folded_exports_a_lora_the_stock_loraloader_loads_whole(
    nodes, sd15, clip, diffusers_maps, folders, caplog
):
    """Issue 22: the default's time-aware map, folded (``fold_act``: one static map fitted to steer like its
    hooks) and exported, loads in the stock LoraLoader with no key left unloaded, and samples what Apply ACT
    gives with the folded map."""
    import nodes as comfy_nodes
    from act_core.lora import export_lora

    pipe, model = sd15
    folded = pipe.fold_act(diffusers_maps["unet_norms"], SOURCE, steps=4, progress=False)
    assert folded.buckets is None and folded.metadata["cfg_rows"] == "all"
    _, loras = folders
    export_lora(folded, pipe, loras / "folded.safetensors", strength=1.0, dtype="fp32")
    unread, _ = lora_report(model, clip, loras / "folded.safetensors")
    assert unread == []
    lam = 0.8
    with caplog.at_level(logging.WARNING):
        lora_model, lora_clip = comfy_nodes.LoraLoader().load_lora(
            model, clip, "folded.safetensors", lam, lam
        )
    assert not [r for r in caplog.records if "not loaded" in r.getMessage().lower()]
    assert len(lora_model.patches) == 2 * len(folded)
    act_model, act_clip = nodes["ACTApply"].apply(model, clip, folded, lam)
    via_lora = cs.sample_tiny(lora_model, lora_clip, "a photo of a lamp", seed=4)
    via_act = cs.sample_tiny(act_model, act_clip, "a photo of a lamp", seed=4)
    base = cs.sample_tiny(model, clip, "a photo of a lamp", seed=4)
    scale = float((via_act - base).abs().max())
    assert scale > 1e-3
    torch.testing.assert_close(via_lora, via_act, rtol=1e-4, atol=1e-4 * scale)

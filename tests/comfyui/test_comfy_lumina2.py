"""Lumina 2 in real ComfyUI (skipped without COMFYUI_PATH): ComfyUI's own NextDiT and a diffusers
Lumina2Transformer2DModel with its weights are the same model; maps fitted in diffusers steer NextDiT as they
steer diffusers, the Fit node fits on NextDiT through ComfyUI's sampler and its map steers KSampler and
diffusers; and NextDiT, the class newer ComfyUI loads Z-Image checkpoints as, has the Z-Image transformer's
module tree, so this family's mapping serves Z-Image there."""

from __future__ import annotations

import warnings

import comfy_family_checks as cfc
import comfy_support as cs  # noqa: E402
import pytest
import torch
from comfy_support import comfyui  # noqa: E402,F401  (session fixture)

pytestmark = cs.requires_comfyui

SOURCE = [f"a red circle number {i}" for i in range(4)]
TARGET = [f"a blue square, striped, number {i}" for i in range(4)]
LATENT = (1, 4, 8, 8)  # 4 latent channels (the tiny VAE's), 2x2 patches: 16 image tokens
TEXT_TOKENS = 7
# A short system prompt and Gemma length keep the diffusers fits on the 2304-wide transformer quick.
SAMPLING = {
    "num_inference_steps": 3,
    "height": 64,
    "width": 64,
    "guidance_scale": 4.0,
    "max_sequence_length": 64,
}


@pytest.fixture(scope="module")
def nodes_pack(comfyui):  # noqa: F811
    return cs.node_callers(cs.load_node_pack())


@pytest.fixture(scope="module")
def lumina(comfyui, tmp_path_factory):  # noqa: F811
    """(ACT Lumina2Pipeline whose transformer is the NextDiT's diffusers twin, ComfyUI's NextDiT MODEL)."""
    import comfy_lumina2
    from diffusers import Lumina2Pipeline
    from tiny_lumina2 import build_tiny_lumina2

    from act_core.diffusers import act_pipeline

    model = comfy_lumina2.build_nextdit(seed=0)
    tiny = build_tiny_lumina2(tmp_path_factory.mktemp("tiny_lumina2"))
    base = Lumina2Pipeline(
        transformer=comfy_lumina2.diffusers_twin(model),
        scheduler=tiny.scheduler,
        vae=tiny.vae,
        text_encoder=tiny.text_encoder,
        tokenizer=tiny.tokenizer,
    )
    base.set_progress_bar_config(disable=True)
    pipe = act_pipeline(base)
    pipe.system_prompt = "Draw."
    return pipe, model


@pytest.fixture(scope="module")
def clip(comfyui):  # noqa: F811
    import comfy_lumina2

    return comfy_lumina2.build_lumina2_clip(seed=0)


@pytest.fixture(scope="module")
def lumina_maps(lumina):
    pipe, _ = lumina
    presets = ("caption_stream", "transformer_blocks", "transformer_norms")
    return cfc.fit_quietly(pipe, SOURCE, TARGET, presets, **SAMPLING)


@pytest.fixture(scope="module")
def inputs():
    generator = torch.Generator().manual_seed(0)
    return {
        "x": torch.randn(LATENT, generator=generator),
        "context": torch.randn(1, TEXT_TOKENS, 32, generator=generator),
    }


def diffusers_velocity(pipe, inputs, sigma: float) -> torch.Tensor:
    """The diffusers transformer at noise level ``sigma`` (it takes ``1 - sigma``), in ComfyUI's sign: its
    output points toward the image, ComfyUI's NextDiT returns the negation."""
    with torch.no_grad():
        out = pipe.transformer(
            hidden_states=inputs["x"],
            timestep=torch.tensor([1.0 - sigma]),
            encoder_hidden_states=inputs["context"],
            encoder_attention_mask=torch.ones(1, TEXT_TOKENS, dtype=torch.long),
            return_dict=False,
        )[0]
    return -out


def comfy_velocity(patcher, inputs, sigma: float) -> torch.Tensor:
    """ComfyUI's NextDiT output for the same inputs, called as its samplers call it (wrappers, sigmas, the
    conditioning's token count)."""
    return cfc.comfy_velocity(
        patcher, inputs["x"], sigma, c_crossattn=inputs["context"], num_tokens=TEXT_TOKENS
    )


def hooked(patcher) -> set[str]:
    """The canonical names whose ComfyUI module carries ACT hooks (a stream's: its block's)."""
    from act_core.families.lumina2 import comfy_transformer_modules

    modules = comfy_transformer_modules(patcher.model.diffusion_model)
    return {name for name, module in modules.items() if hasattr(module, "_act_handle")}


def test_comfyui_nextdit_is_the_same_model_with_the_same_module_names(lumina, inputs):
    from act_core.families import family_of_comfy_model
    from act_core.families.lumina2 import comfy_transformer_modules

    pipe, model = lumina
    assert type(model.model.diffusion_model).__name__ == "NextDiT"
    assert family_of_comfy_model(model.model.diffusion_model) is pipe.act_family
    cfc.check_same_model(pipe, model, inputs, comfy_velocity, diffusers_velocity)
    # Every preset module of the diffusers transformer has a ComfyUI module of the same name, the same
    # weights where it has any (the norms), and the blocks' streams are whole blocks in both hosts.
    comfy_modules = comfy_transformer_modules(model.model.diffusion_model)
    for preset in pipe.act_family.presets:
        names = pipe.act_preset_modules(preset)
        assert set(names) <= set(comfy_modules), preset
        for name, module in names.items():
            ours = comfy_modules[name]
            assert type(ours).__name__.endswith("Block") == type(module).__name__.endswith("Block"), name
            if hasattr(module, "weight"):
                assert torch.equal(ours.weight, module.weight), name


@pytest.mark.parametrize("preset", ["caption_stream", "transformer_blocks", "transformer_norms"])
def test_a_diffusers_fitted_lumina2_map_steers_comfyui_nextdit_as_diffusers(
    nodes_pack, lumina, lumina_maps, inputs, preset
):
    pipe, model = lumina
    act_map = lumina_maps[preset]
    assert act_map.metadata["family"] == "lumina2" and len(act_map.buckets) == 3
    # every module of the map is matched and hooked; in diffusers outside a generation the gate is told the
    # pipeline does not guide, so every row is the prompt's (as ComfyUI's cond rows)
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


def fit_lumina(nodes_pack, model, clip, preset="default"):
    """The Fit ACT map node on the NextDiT MODEL: 4 prompt pairs, 3 steps, cfg 4 with the empty negative.
    Returns the map and the fit's warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = cfc.fit_node(nodes_pack, model, clip, SOURCE, TARGET, preset=preset, cfg=4.0)
    result = out["result"] if isinstance(out, dict) else out  # a node with warnings shows them in the UI
    return result[0], [str(w.message) for w in caught]


def test_the_fit_node_fits_on_comfyui_nextdit_and_the_map_steers_ksampler_and_diffusers(
    nodes_pack, lumina, clip, inputs, caplog
):
    """Fit ACT map samples with ComfyUI's own sampler (its CFG, CLIPTextEncode's conditioning of each prompt:
    NextDiT takes each prompt's token count, so each pair runs in calls of its own, which meet at every hooked
    module: still exact); the map steers KSampler, adds nothing at strength 0, and steers the diffusers twin as it steers
    NextDiT, every module matched."""
    import comfy_lumina2

    pipe, model = lumina
    act_map, caught = fit_lumina(nodes_pack, model, clip)
    meta = act_map.metadata
    assert meta["family"] == "lumina2" and meta["host"] == "comfyui" and meta["preset"] == "caption_stream"
    assert meta["cfg_rows"] == "cond" and meta["sampling"]["cfg"] == 4.0
    assert meta["causal_strategy"] == "exact" and meta["pairs_per_call"] == 1
    assert not any("lagged" in message for message in caught)
    assert len(act_map.buckets) == 3 and len(meta["calibration_gains"]) == 3
    assert set(act_map.modules) == set(pipe.act_preset_modules())  # diffusers' names, all of them

    def sample(patcher, _clip):  # the transformer map's CLIP is the input one
        return comfy_lumina2.sample(patcher, clip, "a red circle number 9", seed=3)

    steered = cfc.check_the_map_steers_ksampler(
        nodes_pack["ACTApply"].apply, model, clip, act_map, sample, caplog
    )
    # Portable: the same map steers the diffusers twin exactly as it steers NextDiT.
    in_comfyui = comfy_velocity(steered, inputs, cfc.SIGMA)
    in_diffusers = cfc.check_a_comfyui_map_steers_diffusers(
        pipe, act_map, inputs, diffusers_velocity, prompt_rows=True
    )
    torch.testing.assert_close(in_comfyui, in_diffusers, rtol=1e-4, atol=1e-4)


def test_zimage_checkpoints_are_nextdit_models_which_the_lumina2_mapping_serves(lumina, nodes_pack, tmp_path):
    """Newer ComfyUI loads Z-Image as ``class ZImage(Lumina2)``: a NextDiT. Every module the Z-Image presets
    hook in diffusers' ZImageTransformer2DModel is a NextDiT module of the same path (the blocks, their
    norms), and NextDiT is this family's: in ComfyUI the lumina2 mapping steers Z-Image (its own fits are
    lumina2 maps). A map fitted on the diffusers ZImagePipeline is a zimage map, which ComfyUI refuses."""
    from tiny_zimage import build_tiny_zimage

    from act_core.diffusers import act_pipeline
    from act_core.errors import ACTModelMismatchError
    from act_core.families import family_of_comfy_model
    from act_core.families.lumina2 import LUMINA2, comfy_transformer_modules

    _, model = lumina
    nextdit = model.model.diffusion_model
    assert family_of_comfy_model(nextdit) is LUMINA2
    zimage = act_pipeline(build_tiny_zimage(tmp_path / "zimage"))  # 2 main blocks, 1 refiner each, as NextDiT
    comfy_modules = comfy_transformer_modules(nextdit)
    for preset in zimage.act_family.presets:
        names = zimage.act_preset_modules(preset)
        assert names, preset
        for name in names:
            path, _, stream = name.removeprefix("transformer.").partition(":")
            ours = nextdit.get_submodule(path)  # raises if NextDiT has no module of this path
            assert type(ours).__name__ == ("JointTransformerBlock" if stream else "RMSNorm"), name
            if stream:  # the block streams are named alike in both families' mappings
                assert comfy_modules[name] is ours
    with pytest.warns(Warning):  # the tests' tokenizer does not know these words
        zimage_map = zimage.fit_act(
            SOURCE[:2],
            TARGET[:2],
            num_inference_steps=2,
            height=32,
            width=32,
            guidance_scale=0.0,
            progress=False,
        )
    with pytest.raises(ACTModelMismatchError, match="Z-Image models are steered in diffusers only"):
        nodes_pack["ACTApply"].apply(model, None, zimage_map, 1.0)


def test_lumina2_maps_do_not_export_as_lora(nodes_pack, lumina, lumina_maps):
    _, model = lumina
    export = nodes_pack["ACTExportLoRA"].export
    cfc.check_no_lora_export(export, model, lumina_maps["transformer_blocks"], "lumina_map")

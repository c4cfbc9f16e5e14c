"""The structural fallback in real ComfyUI: a DiT no family claims (ComfyUI's own AuraFlow ``MMDiT``, tiny, random
weights) is fitted and steered by the output streams of its transformer blocks found by structure; maps are
bound to the class they were fitted on; a model without such blocks is refused (skipped without
COMFYUI_PATH)."""

from __future__ import annotations

import comfy_family_checks as cfc
import comfy_support as cs  # noqa: E402
import pytest
import torch
from comfy_support import comfyui  # noqa: E402,F401  (session fixture)
from torch import nn

pytestmark = cs.requires_comfyui

# ComfyUI's AuraFlow MMDiT at tiny widths: 2 double blocks (MMDiTBlock: returns (c, x)) and 2 single blocks
# (DiTBlock: returns the joined tokens), width 64; its text input is the tiny FLUX CLIP's T5 (width 32).
TINY_AURAFLOW = {
    "in_channels": 4,
    "out_channels": 4,
    "patch_size": 2,
    "dim": 64,
    "n_layers": 4,
    "n_double_layers": 2,
    "n_heads": 2,
    "global_conddim": 64,
    "cond_seq_dim": 32,
    "max_seq": 16 * 16,
}
STREAMS = [
    "transformer.double_layers.0:0",
    "transformer.double_layers.0:1",
    "transformer.double_layers.1:0",
    "transformer.double_layers.1:1",
    "transformer.single_layers.0",
    "transformer.single_layers.1",
]


def build_tiny_auraflow(seed: int = 0, **config):
    """A ModelPatcher of ComfyUI's own AuraFlow (``model_base.AuraFlow``, ``comfy.ldm.aura.mmdit.MMDiT``)."""
    cs.setup_comfy()
    import comfy.supported_models

    model_config = comfy.supported_models.AuraFlow({**TINY_AURAFLOW, **config})
    model_config.set_inference_dtype(torch.float32, None)
    base = model_config.get_model({})
    cs.init_weights(base.diffusion_model, seed)
    return cs.patcher_of(base)


@pytest.fixture(scope="module")
def auraflow(comfyui):  # noqa: F811
    return build_tiny_auraflow()


@pytest.fixture(scope="module")
def clip(comfyui):  # noqa: F811
    import comfy_flux

    return comfy_flux.build_flux_clip(seed=0)


@pytest.fixture(scope="module")
def nodes_pack(comfyui):  # noqa: F811
    return cs.node_callers(cs.load_node_pack())


def fit(nodes_pack, model, clip, **options):
    """The Fit ACT map node with its default preset: 4 prompt pairs, 3 steps, cfg 4."""
    source = [f"a red circle number {i}" for i in range(4)]
    target = [f"a blue square, striped, number {i}" for i in range(4)]
    return cfc.fit_node(nodes_pack, model, clip, source, target, cfg=4.0, **options)


@pytest.fixture(scope="module")
def fitted(nodes_pack, auraflow, clip):
    """(map, summary, the node's UI text): the fallback's warning makes the node show text."""
    out = fit(nodes_pack, auraflow, clip)
    assert isinstance(out, dict), "the Fit node shows the fallback's warning on the node"
    act_map, summary = out["result"]
    return act_map, summary, out["ui"]["text"]


def test_a_dit_no_family_claims_falls_back_to_its_blocks_found_by_structure(auraflow):
    from act_core.families import FAMILIES, STRUCTURAL, family_of_comfy_model
    from act_core.recording import OutputOf

    diffusion_model = auraflow.model.diffusion_model
    name = type(diffusion_model).__name__
    assert name == "MMDiT" and not any(name in f.comfy_denoisers for f in FAMILIES.values())
    assert family_of_comfy_model(diffusion_model) is STRUCTURAL
    with pytest.warns(Warning, match="structural fallback.*6 modules.*double_layers.*single_layers"):
        modules = STRUCTURAL.comfy_denoiser_modules(diffusion_model, None)
    assert list(modules) == STREAMS
    text, image = modules["transformer.double_layers.0:0"], modules["transformer.double_layers.0:1"]
    assert isinstance(text, OutputOf) and (text.index, image.index, text.width) == (0, 1, 64)
    assert modules["transformer.single_layers.1"] is diffusion_model.single_layers[1]
    assert STRUCTURAL.hosts == ("comfyui",)


def test_the_fit_node_fits_by_structure_says_so_and_the_map_steers_ksampler(
    nodes_pack, auraflow, clip, fitted, caplog
):
    """Fit ACT map on a DiT without a family: ComfyUI's own sampler, the structural default preset, a summary
    naming the fallback and what it hooks; Apply ACT steers KSampler (strength 0: exactly the plain output)."""
    act_map, summary = fitted[0], fitted[1]
    meta = act_map.metadata
    assert meta["family"] == "structural" and meta["host"] == "comfyui"
    assert meta["comfy_denoiser"] == "MMDiT" and meta["preset"] == "transformer_blocks"
    assert meta["cfg_rows"] == "cond" and list(act_map.modules) == STREAMS
    assert len(act_map.buckets) == 3 and max(act_map.buckets) == pytest.approx(
        1.0
    )  # sigma: flow, multiplier 1
    assert "structural fallback" in summary and "6 modules" in summary and "MMDiT" in summary
    assert any("structural fallback" in text for text in fitted[2])  # shown on the node too

    def sample(patcher, _clip):  # the transformer map's CLIP is the input one
        return cs.sample_tiny(patcher, clip, "a red circle number 9", seed=3, steps=3, cfg=4.0, size=(8, 8))

    cfc.check_the_map_steers_ksampler(nodes_pack["ACTApply"].apply, auraflow, clip, act_map, sample, caplog)
    assert cfc.hooked_modules(auraflow) == set()


def test_structural_maps_apply_only_to_the_class_they_were_fitted_on(nodes_pack, auraflow, fitted):
    from act_core.errors import ACTModelMismatchError
    from act_core.families import family_of_map

    act_map = fitted[0]
    other_class = act_map.with_metadata({"comfy_denoiser": "HiDreamImageTransformer2DModel"})
    with pytest.raises(
        ACTModelMismatchError, match="HiDreamImageTransformer2DModel.*MMDiT.*only to the class"
    ):
        nodes_pack["ACTApply"].apply(auraflow, None, other_class, 1.0)
    tiny_sdxl, _ = cs.build_tiny_sdxl(seed=0)
    with pytest.raises(ACTModelMismatchError, match="structural fallback on a MMDiT.*UNetModel"):
        nodes_pack["ACTApply"].apply(tiny_sdxl, None, act_map, 1.0)
    cfc.check_no_lora_export(nodes_pack["ACTExportLoRA"].export, auraflow, act_map, "structural_map")
    with pytest.raises(ACTModelMismatchError, match="comfyui only"):  # no diffusers host
        family_of_map(act_map.metadata).check_host("diffusers")


class _Attention(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.qkv = nn.Linear(width, 3 * width)

    def forward(self, x):
        return x


class _PairBlock(nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.attn = _Attention(width)

    def forward(self, c, x):
        def inner():
            return x  # a nested function's return is not the block's

        if c is None:
            return None, inner()
        return c, x


class _MixedBlock(_PairBlock):
    def forward(self, c, x):
        if c is None:
            return x
        return c, x


class _PlainBlock(nn.Module):  # no attention: an MLP stack is not a transformer block list
    def __init__(self, width: int = 8):
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x):
        return self.fc(x)


def test_block_outputs_are_read_off_the_forward_source():
    from act_core.families.structural import structural_modules, tuple_arity

    assert tuple_arity(_PairBlock) == 2
    assert tuple_arity(_MixedBlock) is None and tuple_arity(_PlainBlock) is None  # hooked as one module

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([_PairBlock(), _PairBlock()])
            self.mixed = nn.ModuleList([_MixedBlock(), _MixedBlock()])
            self.narrow = nn.ModuleList([_PairBlock(4), _PairBlock(4)])  # not the hidden width: left out
            self.mlp = nn.ModuleList([_PlainBlock(), _PlainBlock()])

    assert list(structural_modules(Model())) == [
        "transformer.blocks.0:0",
        "transformer.blocks.0:1",
        "transformer.blocks.1:0",
        "transformer.blocks.1:1",
        "transformer.mixed.0",
        "transformer.mixed.1",
    ]


def test_a_model_without_transformer_blocks_is_refused_clearly(nodes_pack, clip, fitted):
    from act_core.errors import ACTModelMismatchError
    from act_core.families import family_of_comfy_model

    class MLPStack(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([_PlainBlock(), _PlainBlock()])

    with pytest.raises(ACTModelMismatchError, match="MLPStack.*does not know.*found no transformer blocks"):
        family_of_comfy_model(MLPStack())
    # ComfyUI's own AuraFlow with one block of each kind: no list of 2 identical blocks to hook.
    single = build_tiny_auraflow(n_layers=2, n_double_layers=1)
    with pytest.raises(ACTModelMismatchError, match="MMDiT.*found no transformer blocks.*it steers SDXL"):
        fit(nodes_pack, single, clip)
    with pytest.raises(ACTModelMismatchError, match="found no transformer blocks"):
        nodes_pack["ACTApply"].apply(single, None, fitted[0], 1.0)  # fitted on an MMDiT with blocks

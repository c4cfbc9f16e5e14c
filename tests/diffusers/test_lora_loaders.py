"""LoRA keys that A1111 and Forge read as well as ComfyUI (issue 22), on every key of a map over every module
the UNet and text-encoder norm presets hook, for the tiny SDXL and SD 1.5 pipelines.

The rules checked are the loaders' (read in their code; README, "LoRA export", says where):

- A1111's Lora extension splits a key at its first "." (module name, network part). A ``lora_unet_`` name that
  its diffusers-name conversion leaves as it is, it looks up as ``diffusion_model_`` + the rest among its
  modules' names (``<module path>`` with dots as underscores). ComfyUI's and Forge's key maps hold
  ``lora_unet_`` + the path of every ``diffusion_model.*.weight``, dots as underscores. So a UNet key has no
  "." before its suffix and the rest names exactly one module of the original-layout (LDM/SGM) UNet: here
  the one ``tests/ldm_checkpoint.py`` names for the diffusers module the diff was computed for (the names
  diffusers' single-file loader reads back, tests/diffusers/test_loading.py).
- ``.diff`` / ``.diff_b`` are full weight / bias diffs: A1111's NetworkModuleFull, applied to the layers whose
  forward its Lora extension patches (Linear, Conv2d, GroupNorm, LayerNorm, MultiheadAttention); ComfyUI's and
  Forge's "diff" patch, on any parameter of the diff's shape.
- Text-encoder norms keep ComfyUI's generic name (``text_encoders.clip_l.transformer.<path>``): ComfyUI reads
  no other name for them (its ``lora_te1_`` names cover attention and MLP linears only); A1111 and Forge read
  none of them.
"""

from __future__ import annotations

import pytest
import torch
from helpers import random_map
from ldm_checkpoint import UNET, unet_key, unet_state
from torch import nn

from act_core.lora import lora_state_dict
from act_core.maps import ACTMap

# The layer types whose forward A1111's Lora extension patches to apply a network's weight diffs.
A1111_PATCHED = (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm, nn.MultiheadAttention)
COMFY_CLIP = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}


@pytest.fixture(scope="module", params=["sdxl", "sd15"])
def pipe(request, tiny_pipe, tmp_path_factory):
    if request.param == "sdxl":
        return tiny_pipe
    from tiny_sd15 import build_tiny_sd15

    from act_core.diffusers import act_pipeline

    return act_pipeline(build_tiny_sd15(tmp_path_factory.mktemp("tiny_sd15_lora_keys")))


@pytest.fixture(scope="module")
def exported(pipe):
    """(map, its modules, the LoRA state dict) of a foldable map with random parameters on every module the
    unet_norms_foldable and text_encoder_norms presets hook."""
    modules = {
        **pipe.act_preset_modules("unet_norms_foldable"),
        **pipe.act_preset_modules("text_encoder_norms"),
    }
    act_map = random_map({name: module.weight.shape[0] for name, module in modules.items()}, seed=3)
    act_map = ACTMap(act_map.modules, {**act_map.metadata, "family": "sdxl"})
    return act_map, modules, lora_state_dict(act_map, pipe)


def test_unet_keys_name_the_ldm_module_a1111_comfyui_and_forge_look_up(pipe, exported):
    act_map, modules, state = exported
    ldm = unet_state(pipe.unet)
    loader_names: dict[str, set[str]] = {}  # LDM module path with dots as underscores -> LDM module paths
    for key in ldm:
        path = key.removeprefix(UNET).rpartition(".")[0]
        loader_names.setdefault(path.replace(".", "_"), set()).add(path)
    layers = pipe.unet.config.layers_per_block
    up_keys = [k for k in pipe.unet.state_dict() if k.startswith("up_blocks.") and ".attentions." in k]
    with_attention = {int(k.split(".")[1]) for k in up_keys}
    unet_names = [name for name in act_map.modules if name.startswith("unet.")]
    assert len(unet_names) > 20 and "unet.conv_norm_out" in unet_names
    seen = set()
    for name in unet_names:
        module, module_map = modules[name], act_map.modules[name]
        assert isinstance(module, (nn.GroupNorm, nn.LayerNorm)) and isinstance(module, A1111_PATCHED)
        # the oracle's original-layout module of this diffusers module
        path = unet_key(name.removeprefix("unet.") + ".weight", layers, with_attention).removesuffix(
            ".weight"
        )
        stem = "lora_unet_" + path.replace(".", "_")
        assert loader_names[stem.removeprefix("lora_unet_")] == {path}  # exactly one module by that name
        for suffix, param in (("diff", "weight"), ("diff_b", "bias")):
            key = f"{stem}.{suffix}"
            assert key.partition(".") == (stem, ".", suffix)  # A1111's split: module name, network part
            value = state[key]
            assert value.shape == ldm[f"{UNET}{path}.{param}"].shape == getattr(module, param).shape
            seen.add(key)
        # the diffs are this module's: (omega - 1) W and (omega - 1) b + beta at strength 1
        omega, beta = module_map.omega, module_map.beta
        torch.testing.assert_close(state[f"{stem}.diff"], (omega - 1) * module.weight.detach())
        torch.testing.assert_close(state[f"{stem}.diff_b"], (omega - 1) * module.bias.detach() + beta)
    assert seen == {key for key in state if key.startswith("lora_unet_")}


def test_text_encoder_norm_keys_are_comfyuis_generic_names(pipe, exported):
    act_map, modules, state = exported
    text_names = [name for name in act_map.modules if not name.startswith("unet.")]
    assert text_names and all(isinstance(modules[name], nn.LayerNorm) for name in text_names)
    expected = set()
    for name in text_names:
        part, _, path = name.partition(".")
        stem = f"text_encoders.{COMFY_CLIP[part]}.transformer.{path}"
        expected |= {f"{stem}.diff", f"{stem}.diff_b"}
    assert expected == {key for key in state if not key.startswith("lora_unet_")}
    # A1111 takes "text_encoders" for the module name: no module of its model, so it skips these keys
    assert {key.partition(".")[0] for key in expected} == {"text_encoders"}

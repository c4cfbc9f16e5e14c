"""The tiny-SDXL fixture runs in real ComfyUI (skipped without COMFYUI_PATH)."""

import os
import sys

import comfy_support as cs  # noqa: E402
import pytest
from comfy_support import comfyui  # noqa: E402,F401  (session fixture)

pytestmark = cs.requires_comfyui


def test_build_tiny_sdxl(comfyui):  # noqa: F811
    model, clip = cs.build_tiny_sdxl(seed=0)
    sd = model.model_state_dict()
    assert "diffusion_model.input_blocks.3.1.transformer_blocks.0.norm1.weight" in sd
    assert "diffusion_model.out.0.weight" in sd
    csd = clip.get_sd()
    assert "clip_l.transformer.text_model.encoder.layers.0.layer_norm1.weight" in csd
    assert "clip_g.transformer.text_model.encoder.layers.2.layer_norm2.bias" in csd
    for v in list(sd.values()) + list(csd.values()):
        assert v.dtype.is_floating_point is False or bool(v.isfinite().all())
    cond = cs.encode(clip, "a cat")
    c, extra = cond[0]
    assert c.shape == (1, 77, cs.TINY_UNET["context_dim"])
    assert extra["pooled_output"].shape == (1, cs.TINY_CLIP_G["hidden_size"])


def test_transformers_and_diffusers_still_import_beside_comfy(comfyui):  # noqa: F811
    """The torchvision stand-in is only present while ComfyUI's modules are imported."""
    import importlib.util

    pytest.importorskip("transformers")
    if importlib.util.find_spec("torchvision") is None:
        assert "torchvision" not in sys.modules
    from transformers import CLIPTextConfig, CLIPTextModel

    m = CLIPTextModel(
        CLIPTextConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1)
    )
    assert m.config.hidden_size == 32


def test_build_is_deterministic(comfyui):  # noqa: F811
    m1, c1 = cs.build_tiny_sdxl(seed=3)
    m2, c2 = cs.build_tiny_sdxl(seed=3)
    m3, _ = cs.build_tiny_sdxl(seed=4)
    s1, s2, s3 = m1.model_state_dict(), m2.model_state_dict(), m3.model_state_dict()
    k = "diffusion_model.input_blocks.3.1.transformer_blocks.0.norm1.weight"
    assert all(s1[key].equal(s2[key]) for key in s1)
    assert not s1[k].equal(s3[k])
    a, b = c1.get_sd(), c2.get_sd()
    assert all(a[key].equal(b[key]) for key in a)


def test_sampling_is_bit_exact_and_prompt_dependent(comfyui):  # noqa: F811
    model, clip = cs.build_tiny_sdxl(seed=0)
    a = cs.sample_tiny(model, clip, "a photo of a cat", seed=7)
    b = cs.sample_tiny(model, clip, "a photo of a cat", seed=7)
    c = cs.sample_tiny(model, clip, "a watercolor painting of a dog", seed=7)
    d = cs.sample_tiny(model, clip, "a photo of a cat", seed=8)
    assert a.shape == (1, 4, 16, 16)
    assert bool(a.isfinite().all())
    assert a.equal(b), "same prompt and seed must give bit-identical latents"
    assert not a.equal(c), "different prompts must give different latents"
    assert not a.equal(d), "different seeds must give different latents"
    # cfg == 1 skips the uncond pass and still runs
    e = cs.sample_tiny(model, clip, "a photo of a cat", seed=7, cfg=1.0)
    assert e.shape == a.shape and not e.equal(a)


# --------------------------------------------------------------------------------------------------
# ComfyUI behaviours the ACT node pack relies on (see docs/dev/comfyui_dev_notes.md), pinned on the tiny model
# --------------------------------------------------------------------------------------------------
UNET_NORM = "diffusion_model.input_blocks.3.1.transformer_blocks.0.norm1"
CLIP_L_NORM = "clip_l.transformer.text_model.encoder.layers.0.layer_norm1"
CLIP_G_NORM = "clip_g.transformer.text_model.encoder.layers.1.layer_norm2"


def _module(root, dotted):
    for part in dotted.split("."):
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root


def test_add_patches_diff_is_applied_while_loaded_and_restored(comfyui):  # noqa: F811
    import torch

    model, clip = cs.build_tiny_sdxl(seed=0)
    base = cs.sample_tiny(model, clip, "a cat", seed=1)
    norm = _module(model.model, UNET_NORM)
    w0 = norm.weight.detach().clone()
    diff = 0.5 * torch.randn(w0.shape, generator=torch.Generator().manual_seed(0))

    m2 = model.clone()
    ret = m2.add_patches({UNET_NORM + ".weight": (diff,), "diffusion_model.no.such.weight": (diff,)}, 0.5)
    assert ret == [
        UNET_NORM + ".weight"
    ]  # unknown keys are dropped silently; the return value says what matched
    patched = cs.sample_tiny(m2, clip, "a cat", seed=1)
    assert not patched.equal(base)
    # the clone shares the nn.Module: while it is loaded, the module holds w + strength * diff
    torch.testing.assert_close(norm.weight.detach(), w0 + 0.5 * diff)
    # loading the original again restores the weights exactly
    assert cs.sample_tiny(model, clip, "a cat", seed=1).equal(base)
    assert norm.weight.detach().equal(w0)


def test_injections_on_unet_and_clip_vanish_with_the_clone(comfyui):  # noqa: F811
    from comfy.patcher_extension import PatcherInjection

    model, clip = cs.build_tiny_sdxl(seed=0)
    base = cs.sample_tiny(model, clip, "a cat", seed=1)
    base_cond = cs.encode(clip, "a cat")[0][0]
    calls = {"unet": 0, "clip": 0}

    def hook_injection(path, name):
        handles = []

        def hook(mod, args, out):
            calls[name] += 1
            return out + 0.1

        def inject(patcher):
            handles.append(_module(patcher.model, path).register_forward_hook(hook))

        def eject(patcher):
            while handles:
                handles.pop().remove()

        return PatcherInjection(inject=inject, eject=eject)

    m2 = model.clone()
    m2.set_injections("act", [hook_injection(UNET_NORM, "unet")])
    c2 = clip.clone()
    c2.patcher.set_injections("act", [hook_injection(CLIP_L_NORM, "clip")])

    assert not cs.encode(c2, "a cat")[0][0].equal(base_cond)
    assert calls["clip"] > 0
    assert not cs.sample_tiny(m2, clip, "a cat", seed=1).equal(base)
    assert calls["unet"] > 0
    n = dict(calls)
    assert cs.encode(clip, "a cat")[0][0].equal(base_cond)
    assert cs.sample_tiny(model, clip, "a cat", seed=1).equal(base)
    assert calls == n, "hooks must be gone once the original model is loaded again"


def test_diffusion_model_wrapper_sees_cond_or_uncond_and_sigmas(comfyui):  # noqa: F811
    from comfy.patcher_extension import WrappersMP

    model, clip = cs.build_tiny_sdxl(seed=0)
    base = cs.sample_tiny(model, clip, "a cat", seed=1)
    seen = []

    def wrapper(executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        seen.append(
            (list(transformer_options["cond_or_uncond"]), transformer_options["sigmas"].clone(), x.shape[0])
        )
        return executor(x, timesteps, context, y, control, transformer_options, **kwargs)

    m2 = model.clone()
    m2.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, "act", wrapper)
    assert cs.sample_tiny(m2, clip, "a cat", seed=1).equal(base)  # a pass-through wrapper changes nothing
    assert len(seen) == 2  # one call per step, cond and uncond batched together
    for coru, sigmas, batch in seen:
        assert sorted(coru) == [0, 1] and batch == 2  # 0 = cond, 1 = uncond
        assert sigmas.shape == (1,)  # the sampler's sigma per latent, NOT repeated for the cond/uncond chunks
    assert seen[0][1][0] > seen[1][1][0]
    seen.clear()
    cs.sample_tiny(m2, clip, "a cat", seed=1, cfg=1.0)
    assert [s[0] for s in seen] == [[0], [0]]  # cfg == 1: no uncond pass


def test_lora_loader_reads_diff_keys_for_unet_and_clip_norms(comfyui):  # noqa: F811
    import comfy.sd
    import torch

    model, clip = cs.build_tiny_sdxl(seed=0)
    z = torch.zeros
    lora = {
        UNET_NORM + ".diff": z(64),
        UNET_NORM + ".diff_b": z(64),
        # diffusers names, with or without "unet.": input_blocks.3.1 is down_blocks.1.attentions.0 in the tiny UNet
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.norm2.diff": z(64),
        "down_blocks.1.resnets.0.norm1.diff_b": z(32),  # -> input_blocks.3.0.in_layers.0.bias
        "lora_unet_conv_norm_out.diff": z(32),  # -> out.0
        "text_encoders." + CLIP_L_NORM + ".diff": z(32),
        "text_encoders." + CLIP_G_NORM + ".diff_b": z(48),
        # not accepted for layer norms: diffusers/kohya text-encoder names only cover attention and MLP linears
        "text_encoder.text_model.encoder.layers.0.layer_norm1.diff": z(32),
        "lora_te1_text_model_encoder_layers_0_layer_norm1.diff": z(32),
    }
    m2, c2 = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)
    assert set(m2.patches) == {
        UNET_NORM + ".weight",
        UNET_NORM + ".bias",
        "diffusion_model.input_blocks.3.1.transformer_blocks.0.norm2.weight",
        "diffusion_model.input_blocks.3.0.in_layers.0.bias",
        "diffusion_model.out.0.weight",
    }
    assert set(c2.patcher.patches) == {CLIP_L_NORM + ".weight", CLIP_G_NORM + ".bias"}
    assert m2.patches[UNET_NORM + ".weight"][0][1][0] == "diff"


def test_load_node_pack_in_process(comfyui, tmp_path):  # noqa: F811
    pack = tmp_path / "probe_pack"
    pack.mkdir()
    (pack / "impl.py").write_text("VALUE = 42\n")
    (pack / "__init__.py").write_text(
        "import nodes as comfy_nodes\nfrom .impl import VALUE\n\nNODE_CLASS_MAPPINGS = {}\nCOMFY_NODES_FILE = comfy_nodes.__file__\n"
    )
    mod = cs.load_node_pack(pack, module_name="act_probe_pack_inprocess")
    assert mod.VALUE == 42 and mod.NODE_CLASS_MAPPINGS == {}
    # inside a pack, `import nodes` is ComfyUI's nodes.py, not this repo's nodes/ package
    assert os.path.dirname(mod.COMFY_NODES_FILE) == comfyui

"""The tiny-SDXL fixture runs in real ComfyUI (skipped without COMFYUI_PATH)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import comfy_support as cs  # noqa: E402
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

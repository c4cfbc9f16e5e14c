"""The shipped model in real ComfyUI: the same model as in diffusers, and the Fit node steers it as the
diffusers path does (skipped without COMFYUI_PATH)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import comfy_support as cs  # noqa: E402
import numpy as np
import pytest
import torch
from comfy_support import comfyui  # noqa: E402,F401  (session fixture)

pytestmark = cs.requires_comfyui

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "models" / "shapes-sdxl"
STEPS, CFG, SIZE = 20, 3.0, 32  # the shipped model's sampling settings (docs/demo_model.md)
LATENT = SIZE // 4  # its VAE downsamples by 4; ComfyUI's nodes assume 8, so the Fit node gets 2 * SIZE
SAMPLER, SCHEDULER = "euler", "simple"  # ComfyUI's "simple" schedule is diffusers' "trailing" spacing


@pytest.fixture(scope="module")
def shipped(comfyui):  # noqa: F811
    import comfy_shapes

    return comfy_shapes.load_unet(SHIPPED), comfy_shapes.load_clip(SHIPPED)


@pytest.fixture(scope="module")
def diffusers_pipe():
    from act_core.diffusers import act_pipeline
    from demo.paths import load_demo_pipeline

    return act_pipeline(load_demo_pipeline())


def test_the_shipped_model_is_the_same_model_in_comfyui(shipped, diffusers_pipe):
    model, clip = shipped
    pipe = diffusers_pipe
    prompt = "a red circle, striped"
    cond, pooled = clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True)
    embeds, _, reference_pooled, _ = pipe.encode_prompt(
        [prompt], device="cpu", do_classifier_free_guidance=False
    )
    torch.testing.assert_close(cond, embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, reference_pooled, atol=1e-5, rtol=1e-5)
    x = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500.0])
    time_ids = pipe._get_add_time_ids(
        (SIZE, SIZE), (0, 0), (SIZE, SIZE), dtype=torch.float32, text_encoder_projection_dim=32
    )
    with torch.no_grad():
        reference = pipe.unet(
            x,
            t,
            encoder_hidden_states=embeds,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
        ).sample
        y = model.model.encode_adm(pooled_output=pooled, width=SIZE, height=SIZE)
        ours = model.model.diffusion_model(x, t, context=cond, y=y)
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)


def _images(pipe, model, clip, prompts, seed):
    """KSampler's path (comfy.sample.sample) per prompt, decoded with the model's own VAE, as uint8."""
    import comfy.sample

    latents = []
    for i, prompt in enumerate(prompts):
        latent = torch.zeros(1, 4, LATENT, LATENT)
        noise = comfy.sample.prepare_noise(latent, seed + i)
        positive, negative = cs.encode(clip, prompt), cs.encode(clip, "")
        latents.append(
            comfy.sample.sample(
                model,
                noise,
                STEPS,
                CFG,
                SAMPLER,
                SCHEDULER,
                positive,
                negative,
                latent,
                disable_pbar=True,
                seed=seed + i,
            )
        )
    with torch.no_grad():
        decoded = pipe.vae.decode(torch.cat(latents)).sample
    images = ((decoded / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).numpy()


@pytest.mark.slow
def test_the_fit_node_steers_the_shipped_model_as_diffusers_does(shipped, diffusers_pipe):
    """Issue 11: the Fit node's map, applied with Apply ACT on the same sampler, reaches the same effect
    on the style task as the diffusers path (the harness's table row), within sampling noise."""
    from demo.classifier import predict_proba  # noqa: F401 - the harness's scorer uses it
    from demo.paths import load_demo_classifier
    from demo.protocols import EVAL_SEED, MODELS, PROTOCOLS, effect, fit_map, score_curve, score_images, tasks

    model, clip = shipped
    nodes = cs.node_callers(cs.load_node_pack())
    classifier = load_demo_classifier()
    task = tasks()["style"]
    with torch.inference_mode():
        act_map, _ = nodes["ACTFitMap"](
            model,
            clip,
            "\n".join(task.source),
            "\n".join(task.target),
            "unet_norms",
            "",
            "linear",
            "auto",
            "preset",
            0,
            8 * LATENT,
            8 * LATENT,
            STEPS,
            4,
            cfg=CFG,
            sampler_name=SAMPLER,
            scheduler=SCHEDULER,
        )
    assert len(act_map.buckets) == STEPS and act_map.metadata["host"] == "comfyui"
    scores = {}
    for lam in (0.0, 1.0):
        steered, steered_clip = nodes["ACTApply"](model, clip, act_map, lam)
        with torch.inference_mode():
            images = _images(diffusers_pipe, steered, steered_clip, task.source, EVAL_SEED)
        scores[lam] = score_images(classifier, images, task)
    with torch.inference_mode():
        ceiling = score_images(classifier, _images(diffusers_pipe, model, clip, task.target, EVAL_SEED), task)
    comfy_effect = effect(scores[1.0]["score"], scores[0.0]["score"], ceiling["score"])

    model_settings = replace(MODELS["shipped"], steps=STEPS, guidance=CFG)
    reference_map, _ = fit_map(diffusers_pipe, model_settings, task, PROTOCOLS["new_default"])
    reference = score_curve(diffusers_pipe, classifier, model_settings, task, reference_map, {}, (0.0, 1.0))
    diffusers_effect = reference["curve"][1]["effect"]
    print(
        f"style, lambda 1: ComfyUI effect {comfy_effect:.2f} / shape {scores[1.0]['shape']:.2f}; "
        f"diffusers {diffusers_effect:.2f} / {reference['curve'][1]['shape']:.2f}"
    )
    assert scores[0.0]["score"] < 0.1 and comfy_effect >= 0.8 and scores[1.0]["shape"] >= 0.85
    assert abs(comfy_effect - diffusers_effect) <= 0.2
    assert np.isfinite(comfy_effect)

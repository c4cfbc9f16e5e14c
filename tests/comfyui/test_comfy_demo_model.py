"""The "ACT demo model" node: the shipped shapes models as ComfyUI MODEL / CLIP / VAE (skipped without
COMFYUI_PATH). Each is the same model as in diffusers, and the node's model fits and steers in ComfyUI."""

from __future__ import annotations

import importlib
from pathlib import Path

import comfy_support as cs  # noqa: E402
import pytest
import torch
from comfy_support import comfyui  # noqa: E402,F401  (session fixture)

pytestmark = cs.requires_comfyui

REPO = Path(__file__).resolve().parents[2]
STEPS, CFG, LATENT = 20, 3.0, 8  # the shipped model's settings: 32 px images are 8x8 latents (a 4x VAE)


@pytest.fixture(scope="module")
def pack(comfyui):  # noqa: F811
    return cs.load_node_pack()


@pytest.fixture(scope="module")
def shapes_models(pack):
    return importlib.import_module(f"{pack.__name__}.nodes.shapes_models")


@pytest.fixture(scope="module")
def demo_node(pack):
    return cs.node_callers(pack)["ACTDemoModel"]


def test_the_node_offers_the_shipped_models(demo_node, shapes_models):
    schema = demo_node.GET_SCHEMA()
    assert schema.category == "ACT/demo" and schema.display_name == "ACT demo model"
    spec = demo_node.INPUT_TYPES()["required"]["model_name"]
    assert spec[1]["options"] == ["shapes-sdxl", "shapes-sdxl-d"] and spec[1]["default"] == "shapes-sdxl"
    assert demo_node.RETURN_TYPES == ["MODEL", "CLIP", "VAE"]
    assert all(
        (shapes_models.MODELS_DIR / name / "model_index.json").is_file() for name in spec[1]["options"]
    )


@pytest.mark.parametrize("name", ["shapes-sdxl", "shapes-sdxl-d"])
def test_each_demo_model_is_the_diffusers_model(demo_node, name):
    """Text conditioning, a UNet call and the VAE both ways match diffusers' pipeline of the same folder."""
    from diffusers import StableDiffusionXLPipeline

    model, clip, vae = demo_node(name)
    pipe = StableDiffusionXLPipeline.from_pretrained(REPO / "models" / name, local_files_only=True)
    prompt = "a red circle, striped"
    cond, pooled = clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True)
    embeds, _, reference_pooled, _ = pipe.encode_prompt(
        [prompt], device="cpu", do_classifier_free_guidance=False
    )
    torch.testing.assert_close(cond, embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, reference_pooled, atol=1e-5, rtol=1e-5)
    x = torch.randn(2, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500.0, 500.0])
    size = 4 * LATENT
    time_ids = pipe._get_add_time_ids(
        (size, size),
        (0, 0),
        (size, size),
        dtype=torch.float32,
        text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
    )
    with torch.no_grad():
        reference = pipe.unet(
            x,
            t,
            encoder_hidden_states=embeds.expand(2, -1, -1),
            added_cond_kwargs={"text_embeds": pooled.expand(2, -1), "time_ids": time_ids.expand(2, -1)},
        ).sample
        y = model.model.encode_adm(pooled_output=pooled, width=size, height=size).expand(2, -1)
        ours = model.model.diffusion_model(x, t, context=cond.expand(2, -1, -1), y=y)
        decoded = pipe.vae.decode(x).sample
        pixels = torch.rand(1, size, size, 3, generator=torch.Generator().manual_seed(1))
        encoded = pipe.vae.encode(pixels.movedim(-1, 1) * 2 - 1).latent_dist.mean
        assert vae.decode(x).shape == (2, size, size, 3)  # ComfyUI's IMAGE layout: 4x the latent
        torch.testing.assert_close(vae.decode(x), (decoded / 2 + 0.5).clamp(0, 1).movedim(1, -1))
        torch.testing.assert_close(vae.encode(pixels), encoded)
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)
    assert model.model.latent_format.scale_factor == pipe.vae.config.scaling_factor


def test_unknown_or_missing_demo_models_are_refused(shapes_models, monkeypatch, tmp_path):
    from act_core.errors import ACTInputError

    with pytest.raises(ACTInputError, match="Unknown demo model 'shapes-sdxl-b'; the demo models are"):
        shapes_models.model_folder("shapes-sdxl-b")
    monkeypatch.setattr(shapes_models, "MODELS_DIR", tmp_path)
    with pytest.raises(ACTInputError, match="folder .* is missing; it ships with the ComfyUI-ACT repository"):
        shapes_models.model_folder("shapes-sdxl")


def test_the_demo_model_fits_and_steers_in_comfyui(pack, demo_node):
    """The template's recipe in-process: fit the style task's 24 pairs with the model's settings (64 px for
    ComfyUI's 8x latent nodes = 8x8 latents = 32 px images), apply at strength 1, sample a prompt the fit
    never saw and read it with the shipped classifier: striped, and still a green star."""
    import comfy.sample

    from demo.classifier import predict_proba
    from demo.paths import load_demo_classifier
    from demo.protocols import tasks

    nodes = cs.node_callers(pack)
    model, clip, vae = demo_node("shapes-sdxl")
    task = tasks()["style"]
    with torch.inference_mode():
        act_map, summary = nodes["ACTFitMap"](
            model,
            clip,
            "\n".join(task.source),
            "\n".join(task.target),
            "default",
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
            sampler_name="euler",
            scheduler="simple",
        )
    assert summary.startswith("ACT map: 51 modules") and len(act_map.buckets) == STEPS
    classifier = load_demo_classifier()
    labels = {}
    for strength in (0.0, 1.0):
        steered, steered_clip = nodes["ACTApply"](model, clip, act_map, strength)
        latent = torch.zeros(4, 4, LATENT, LATENT)
        with torch.inference_mode():
            samples = comfy.sample.sample(
                steered,
                comfy.sample.prepare_noise(latent, 42),
                STEPS,
                CFG,
                "euler",
                "simple",
                cs.encode(steered_clip, "a green star"),
                cs.encode(steered_clip, ""),
                latent,
                disable_pbar=True,
                seed=42,
            )
            probabilities = predict_proba(classifier, vae.decode(samples).movedim(-1, 1))
        labels[strength] = {
            head: [classifier.labels[head][i] for i in probabilities[head].argmax(-1).tolist()]
            for head in ("shape", "colour", "style")
        }
    assert labels[0.0]["style"].count("solid") >= 3, labels
    assert labels[1.0]["style"].count("striped") >= 3, labels
    for strength in (0.0, 1.0):
        assert labels[strength]["shape"].count("star") >= 3 and labels[strength]["colour"].count("green") >= 3

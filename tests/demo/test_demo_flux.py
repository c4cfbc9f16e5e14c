"""The shipped FLUX.1-architecture shapes model: loads offline as a plain FluxPipeline, draws what it is asked,
and the default ACT fit steers it (trends with generous margins; docs/protocol.md has the measured table)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from diffusers import FluxPipeline

from demo.evaluation import generate
from demo.paths import REPO_ROOT, load_demo_classifier
from demo.protocols import MODELS, load_model_pipeline, score_curve, score_images, tasks

FLUX_MODEL = MODELS["flux"]


@pytest.fixture(scope="module")
def flux_models():
    """Both shipped FLUX models, loaded once each: name -> (pipeline, classifier)."""
    torch.set_num_threads(1)
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            model = MODELS[name]
            cache[name] = load_model_pipeline(model), load_demo_classifier(model.classifier)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def flux(flux_models):
    return flux_models("flux")


@pytest.mark.parametrize("folder_name", ["shapes-flux", "shapes-flux-b"])
def test_shipped_flux_folders_are_small_and_plain_diffusers_folders(folder_name):
    folder = REPO_ROOT / "models" / folder_name
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size < 5 * 2**20, size
    pipe = FluxPipeline.from_pretrained(folder, local_files_only=True)  # no ACT, no demo code needed
    assert type(pipe.transformer).__name__ == "FluxTransformer2DModel"


def test_flux_samples_follow_the_prompt(flux):
    pipe, classifier = flux
    task = tasks()["colour_red_yellow"]
    subset = replace(task, target=task.target[:12], shapes=task.shapes[:12])
    images = generate(pipe, list(subset.target), steps=FLUX_MODEL.steps, guidance=1.0, **FLUX_MODEL.sampling)
    assert images.shape == (12, 32, 32, 3)
    scores = score_images(classifier, images, subset)  # "a yellow <shape>": yellow, and that shape
    assert scores["score"] > 0.8 and scores["shape"] >= 0.75, scores


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["flux", "flux-b"])
@pytest.mark.parametrize("task_name", ["colour_red_yellow", "style"])
def test_default_fit_steers_both_flux_models(flux_models, model_name, task_name):
    """Colour reaches FLUX through T5's tokens, stripes through CLIP's pooled vector: the default hooks both."""
    model = MODELS[model_name]
    pipe, classifier = flux_models(model_name)
    task = tasks()[task_name]
    subset = slice(0, 24, 2)
    small = replace(task, source=task.source[subset], target=task.target[subset], shapes=task.shapes[subset])
    act_map = pipe.fit_act(
        list(task.source),
        list(task.target),
        num_inference_steps=model.steps,
        guidance_scale=1.0,
        progress=False,
        **model.sampling,
    )
    assert act_map.metadata["preset"] == "pooled_text_and_blocks" and len(act_map.buckets) == model.steps
    assert "transformer.time_text_embed.text_embedder" in act_map.modules
    curve = score_curve(pipe, classifier, model, small, act_map, {}, (0.0, 1.0))["curve"]
    assert curve[0]["score"] < 0.2 and curve[1]["effect"] > 0.7, curve
    # flux-b draws shapes less reliably (0.6 without CFG): shapes are kept relative to its plain samples
    assert curve[1]["shape"] >= min(0.75, curve[0]["shape"] - 0.15), curve


@pytest.mark.slow
def test_flux_routes_finds_the_stripes_in_the_pooled_vector():
    """The route study behind the FLUX default: shapes-flux draws stripes from CLIP's pooled vector."""
    from demo.flux_routes import main as flux_routes

    rows = {row["case"]: row for row in flux_routes(["--models", "flux", "--tasks", "style"])}
    assert rows["source prompt"]["score"] < 0.1 and rows["target prompt"]["score"] > 0.8, rows
    assert rows["source tokens, target pooled"]["score"] > 0.7, rows
    assert rows["target tokens, source pooled"]["score"] < 0.1, rows

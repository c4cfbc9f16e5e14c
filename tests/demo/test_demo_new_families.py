"""The shipped Z-Image- and Qwen-Image-architecture shapes models: plain diffusers folders, trained on what the
pipelines feed them (their chat templates, their prompt encodings), drawing what they are asked; and the
default ACT fit steers them (slow; docs/demo_model.md has the measured harness table)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from diffusers import QwenImagePipeline, ZImagePipeline

from demo import qwenimage_model, zimage_model
from demo.evaluation import generate
from demo.paths import REPO_ROOT, load_demo_classifier
from demo.protocols import (
    MODELS,
    PROTOCOLS,
    fit_map,
    load_model_pipeline,
    score_curve,
    score_images,
    tasks,
)
from demo.shapes import caption_words

FOLDERS = {"zimage": ("shapes-zimage", ZImagePipeline), "qwenimage": ("shapes-qwenimage", QwenImagePipeline)}


@pytest.fixture(scope="module")
def models():
    """Both new models, loaded once each through the harness: name -> (ACT pipeline, classifier)."""
    torch.set_num_threads(1)
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            model = MODELS[name]
            cache[name] = load_model_pipeline(model), load_demo_classifier(model.classifier)
        return cache[name]

    return get


@pytest.mark.parametrize("name", sorted(FOLDERS))
def test_shipped_folders_are_small_plain_diffusers_folders(name):
    folder_name, pipeline = FOLDERS[name]
    folder = REPO_ROOT / "models" / folder_name
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size < 5 * 2**20, size
    pipe = pipeline.from_pretrained(folder, local_files_only=True)  # no ACT, no demo code needed
    assert (folder / "training_info.json").is_file()
    assert pipe.transformer.dtype == torch.float32  # fp16 files, float32 configs


def test_caption_words_are_single_tokens_and_the_qwenimage_template_drops_its_34():
    pipe = QwenImagePipeline.from_pretrained(REPO_ROOT / "models" / "shapes-qwenimage", local_files_only=True)
    tokenizer = pipe.tokenizer
    prefix = pipe.prompt_template_encode.split("{}")[0]
    assert len(tokenizer(prefix).input_ids) == pipe.prompt_template_encode_start_idx == 34
    z_tokenizer = ZImagePipeline.from_pretrained(
        REPO_ROOT / "models" / "shapes-zimage", local_files_only=True
    ).tokenizer
    for tok in (tokenizer, z_tokenizer):
        for word in caption_words():  # alone, and after a space (as in a caption) for the words
            assert len(tok(word).input_ids) == 1, word
            assert not word.isalpha() or len(tok(" " + word).input_ids) == 1, word
        assert len(tok("a purple triangle, outlined").input_ids) == 5


@torch.no_grad()
def test_the_trainers_encode_prompts_as_the_pipelines_do():
    """Training ran the text encoders on what the pipelines compute: Z-Image's chat template and Qwen3's
    second-to-last states of the real tokens; Qwen-Image's template, less its 34 tokens, zero-padded."""
    prompts = ["a red circle, striped", "a blue star", ""]
    z = ZImagePipeline.from_pretrained(REPO_ROOT / "models" / "shapes-zimage", local_files_only=True)
    expected, _ = z.encode_prompt(list(prompts), device="cpu", do_classifier_free_guidance=False)
    got = zimage_model.encode(z.text_encoder, *zimage_model.template_ids(z.tokenizer)(prompts))
    for e, g in zip(expected, got, strict=True):
        assert e.shape == g.shape and torch.allclose(e, g, atol=1e-5)
    q = QwenImagePipeline.from_pretrained(REPO_ROOT / "models" / "shapes-qwenimage", local_files_only=True)
    embeds, mask = q.encode_prompt(list(prompts), device="cpu")
    got, got_mask = qwenimage_model.encode(
        q.text_encoder, *qwenimage_model.template_ids(q.tokenizer)(prompts)
    )
    assert torch.allclose(embeds, got, atol=1e-5) and torch.equal(mask, got_mask)


@pytest.mark.parametrize("name", sorted(FOLDERS))
def test_samples_follow_the_prompt(models, name):
    model = MODELS[name]
    pipe, classifier = models(name)
    task = tasks()["colour_red_yellow"]
    subset = replace(task, target=task.target[:12], shapes=task.shapes[:12])
    images = generate(pipe, list(subset.target), steps=model.steps, guidance=model.guidance, **model.sampling)
    assert images.shape == (12, 32, 32, 3)
    scores = score_images(classifier, images, subset)  # "a yellow <shape>": yellow, and that shape
    assert scores["score"] > 0.8 and scores["shape"] >= 0.75, scores


def fit_and_score(models, name: str, task_name: str, protocol_name: str = "new_default") -> dict:
    """The harness's cell at lambda 0 and 1: fit with the protocol on the task's 24 pairs, score its prompts
    (the same fit and noise seeds as ``python -m demo.protocols``, so the same numbers)."""
    model = MODELS[name]
    pipe, classifier = models(name)
    act_map, _ = fit_map(pipe, model, tasks()[task_name], PROTOCOLS[protocol_name])
    assert len(act_map.buckets) == model.steps
    return score_curve(pipe, classifier, model, tasks()[task_name], act_map, {}, (0.0, 1.0))


# Measured with the harness (docs/demo_model.md): the families' default preset (transformer_blocks) does not
# reach the prompted stripes at lambda 1 on these models (effect 0.00 on Z-Image, 0.55 on Qwen-Image; both get
# there at lambda 1.5). strict: these fail loudly once a default steers them, so docs and tests get updated.
DEFAULT_UNDER_STEERS = pytest.mark.xfail(
    strict=True, reason="the default transformer_blocks under-steers style at lambda 1 (docs/demo_model.md)"
)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, protocol_name",
    [
        pytest.param("zimage", "new_default", marks=DEFAULT_UNDER_STEERS),
        pytest.param("qwenimage", "new_default", marks=DEFAULT_UNDER_STEERS),
        ("zimage", "zimage_caption_stream"),
    ],
)
def test_fit_steers_style(models, name, protocol_name):
    """Solid shapes to striped ones (effect >= 0.8 at lambda 1, shapes kept: the harness's pass). On Z-Image the
    caption tokens' own stream (the context refiner's output, before they join the image tokens in one
    sequence) steers where the joint stream does not."""
    run = fit_and_score(models, name, "style", protocol_name)
    assert run["curve"][0]["score"] < 0.2 and run["passes"], run["curve"]


@pytest.mark.slow
@pytest.mark.parametrize("task_name", ["colour", "colour_red_yellow", "negation"])
def test_default_fit_steers_colour_and_negation_on_qwenimage(models, task_name):
    """Qwen-Image's default (every block's text and image outputs) passes the colour tasks and negation."""
    run = fit_and_score(models, "qwenimage", task_name)
    assert run["passes"], run["curve"]

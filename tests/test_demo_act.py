"""ACT on the shipped demo model: a small fit moves the target score up with lambda (a trend, not a timing)."""

from __future__ import annotations

import pytest

from act_core.diffusers.pipeline import act_pipeline
from demo.paths import load_demo_classifier, load_demo_pipeline
from demo.run_demo import EVAL_SEED, evaluate, experiments


@pytest.fixture(scope="module")
def demo():
    return act_pipeline(load_demo_pipeline()), load_demo_classifier()


def test_style_score_rises_with_lambda_and_shape_is_kept(demo):
    pipe, classifier = demo
    style = experiments(1)[0]
    subset = slice(0, 24, 2)  # every shape, two colours: 12 prompts
    style.eval_prompts, style.eval_shapes = style.eval_prompts[subset], style.eval_shapes[subset]
    act_map = pipe.fit_act(
        style.fit_source, style.fit_target, preset="text_encoder_and_unet_norms", progress=False
    )
    scores = []
    pipe.enable_act(act_map, strength=0.0)
    for lam in (0.0, 0.5, 1.0):
        pipe.set_act_strength(lam)
        scores.append(
            evaluate(pipe, classifier, style, style.eval_prompts, EVAL_SEED, steps=10, guidance=3.0)
        )
    pipe.disable_act()
    striped = [s["score"] for s in scores]
    assert striped[0] < 0.05 < striped[2] - 0.5, striped
    assert striped[0] <= striped[1] <= striped[2], striped
    assert scores[2]["shape_accuracy"] >= 0.75, scores

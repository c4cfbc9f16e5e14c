"""ACT on the shipped demo model with the default protocol: the score rises with lambda, at the fitted step
count and at others (a trend with generous margins, not a timing)."""

from __future__ import annotations

import pytest

from act_core.diffusers import act_pipeline
from demo.paths import load_demo_classifier, load_demo_pipeline
from demo.run_demo import EVAL_SEED, evaluate, experiments

GUIDANCE = 3.0


@pytest.fixture(scope="module")
def demo():
    return act_pipeline(load_demo_pipeline()), load_demo_classifier()


@pytest.fixture(scope="module")
def style(demo):
    """The style task on 12 evaluation prompts (every shape, two colours) and its default map (25 steps)."""
    pipe, _ = demo
    task = experiments(1)[0]
    subset = slice(0, 24, 2)
    task.eval_prompts, task.eval_shapes = task.eval_prompts[subset], task.eval_shapes[subset]
    act_map = pipe.fit_act(
        task.fit_source, task.fit_target, num_inference_steps=25, guidance_scale=GUIDANCE, progress=False
    )
    return task, act_map


def _curve(demo, task, act_map, steps):
    pipe, classifier = demo
    scores = []
    pipe.enable_act(act_map, strength=0.0)
    try:
        for lam in (0.0, 0.5, 1.0):
            pipe.set_act_strength(lam)
            scores.append(
                evaluate(pipe, classifier, task, task.eval_prompts, EVAL_SEED, steps=steps, guidance=GUIDANCE)
            )
    finally:
        pipe.disable_act()
    return scores


@pytest.mark.parametrize("steps", [25, 12, 40])
def test_default_map_fitted_at_25_steps_steers_at_12_25_and_40(demo, style, steps):
    task, act_map = style
    assert len(act_map.buckets) == 25
    scores = _curve(demo, task, act_map, steps)
    striped = [s["score"] for s in scores]
    assert striped[0] < 0.1 and striped[2] > 0.6, striped
    assert striped[0] <= striped[1] + 0.05 and striped[1] <= striped[2] + 0.05, striped  # grows with lambda
    assert scores[2]["shape_accuracy"] >= 0.75, scores

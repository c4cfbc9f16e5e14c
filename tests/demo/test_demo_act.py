"""ACT on the shipped demo model with the default protocol: the score rises with lambda, at the fitted step
count and at others (a trend with generous margins, not a timing)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from act_core.diffusers import act_pipeline
from demo.paths import load_demo_classifier, load_demo_pipeline
from demo.protocols import MODELS, score_curve, tasks

GUIDANCE = 3.0


@pytest.fixture(scope="module")
def demo():
    return act_pipeline(load_demo_pipeline()), load_demo_classifier()


@pytest.fixture(scope="module")
def style(demo):
    """The style task on 12 evaluation prompts (every shape, two colours) and its default map (25 steps)."""
    pipe, _ = demo
    task = tasks()["style"]
    act_map = pipe.fit_act(
        list(task.source), list(task.target), num_inference_steps=25, guidance_scale=GUIDANCE, progress=False
    )
    subset = slice(0, 24, 2)
    return replace(
        task, source=task.source[subset], target=task.target[subset], shapes=task.shapes[subset]
    ), act_map


def _curve(demo, task, act_map, steps):
    pipe, classifier = demo
    model = replace(MODELS["shipped"], steps=steps, guidance=GUIDANCE)
    return score_curve(pipe, classifier, model, task, act_map, {}, (0.0, 0.5, 1.0))["curve"]


@pytest.mark.slow
@pytest.mark.parametrize("steps", [25, 12, 40])
def test_default_map_fitted_at_25_steps_steers_at_12_25_and_40(demo, style, steps):
    task, act_map = style
    assert len(act_map.buckets) == 25
    scores = _curve(demo, task, act_map, steps)
    striped = [s["score"] for s in scores]
    assert striped[0] < 0.1 and striped[2] > 0.6, striped
    assert striped[0] <= striped[1] + 0.05 and striped[1] <= striped[2] + 0.05, striped  # grows with lambda
    assert scores[2]["shape"] >= 0.75, scores


def test_fewer_pairs_keeps_evenly_spaced_aligned_pairs_and_refuses_too_few():
    from demo.protocols import fewer_pairs, main

    task = tasks()["style"]
    six = fewer_pairs(task, 6)
    assert len(six.source) == len(six.target) == len(six.shapes) == 6
    assert six.source[0] == task.source[0] and six.source[-1] == task.source[-1]
    for source, target, shape in zip(six.source, six.target, six.shapes, strict=True):
        i = task.source.index(source)
        assert task.target[i] == target and task.shapes[i] == shape
    assert len(set(six.shapes)) > 1  # spread over shapes, not the first six of one
    assert fewer_pairs(task, None) is task and fewer_pairs(task, 100) is task
    with pytest.raises(SystemExit):
        main(["--fit-pairs", "1", "--models", "shipped", "--only", "new_default"])
    for wrong in (["--models", "nope"], ["--tasks", "nope"], ["--only", "nope"]):
        with pytest.raises(SystemExit):  # named with the choices before any model loads
            main(wrong)

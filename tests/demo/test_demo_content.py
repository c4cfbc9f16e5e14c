"""The widened harness (issue 23): every style, the content rule, other samplers, sampler transfer and the
smoothness measure."""

from __future__ import annotations

import numpy as np
import pytest

from demo.protocols import (
    MODELS,
    alignment_markdown,
    generation_settings,
    keeps_content,
    load_model_pipeline,
    markdown,
    pixel_distance,
    tasks,
    use_scheduler,
)
from demo.shapes import STYLES


def test_every_style_of_the_shapes_data_has_a_task_and_keeps_every_shape():
    all_tasks = tasks()
    goals = {t.goal for t in all_tasks.values() if t.head == "style"}
    assert set(STYLES) - {"solid"} <= goals
    for task in all_tasks.values():
        assert len(task.source) == len(task.target) == len(task.shapes)
        assert len(set(task.shapes)) >= 4  # every shape, so content has to be kept


def test_the_content_rule_is_absolute_or_relative_to_the_prompts_own_shape():
    assert keeps_content(0.85, 0.2) and keeps_content(0.70, 0.78) and not keeps_content(0.70, 0.95)


def test_pixel_distance_is_a_share_of_full_scale():
    a = np.zeros((2, 4, 4, 3), np.uint8)
    assert pixel_distance(a, a) == 0.0 and pixel_distance(a + 255, a) == pytest.approx(1.0)


def test_sampler_variants_fit_with_one_sampler_and_apply_with_another():
    transfer = MODELS["shipped@to_dpm40"]
    gen, scheduler = generation_settings(transfer)
    assert transfer.scheduler is None and gen["steps"] == 40 and scheduler[0] == "DPMSolverMultistepScheduler"
    assert generation_settings(MODELS["flux@to8"])[0]["steps"] == 8
    assert MODELS["d@euler_a"].scheduler[0] == "EulerAncestralDiscreteScheduler"


def test_use_scheduler_swaps_and_restores_the_models_own():
    pipe = load_model_pipeline(MODELS["shipped"])
    own = pipe.scheduler
    use_scheduler(pipe, MODELS["shipped@dpm2m"].scheduler)
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert pipe.scheduler.config.num_train_timesteps == own.config.num_train_timesteps
    use_scheduler(pipe, None)
    assert pipe.scheduler is own


def test_cells_whose_prompt_does_not_draw_its_target_are_not_counted():
    def run(effect: float, passes: bool, reaches: bool) -> dict:
        curve = [
            {"lambda": 0.0, "effect": 0.0, "shape": 1.0},
            {"lambda": 1.0, "effect": effect, "shape": 1.0},
        ]
        return {"curve": curve, "passes": passes, "prompt_reaches": reaches, "ceiling": 0.01}

    results = {"p": {"m": {"dotted": run(11.1, True, False), "style": run(0.9, True, True)}}}
    table = markdown(results, ["m"], ["dotted", "style"])
    assert "n/a (prompt 0.01)" in table and "| 1/1 |" in table


def test_the_alignment_table_shows_each_cells_mean_cosine():
    results = {"p": {"m": {"outline": {"alignment": 0.4412}, "style": {"alignment": None}}}}
    table = alignment_markdown(results, ["m"], ["outline", "style", "dotted"])
    assert table.splitlines()[-1] == "| p | 0.44 | - | - |"

"""Fitting with schedulers that evaluate a noise level more than once (Heun, KDPM2, repeated timesteps):
one map and one calibration per noise level (issue 17, item 5)."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import record_scale_steps

from act_core.trajectory import TrajectoryFit

# KDPM2's numpy sigma interpolation warns on every step (third-party code, harmless)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
SOURCE = ["a red circle", "a blue square", "a green triangle", "a red square"]
TARGET = [p + ", striped" for p in SOURCE]
SETTINGS = {"num_inference_steps": 3, "guidance_scale": 5.0, "height": 32, "width": 32, "progress": False}


@pytest.fixture()
def scaled_levels(monkeypatch):
    return record_scale_steps(monkeypatch)


def _fit_with(pipe, scheduler_class, **options):
    from act_core.diffusers import act_pipeline

    scheduler = scheduler_class.from_config(pipe.scheduler.config, **options)
    other = act_pipeline(type(pipe).from_pipe(pipe, scheduler=scheduler))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny tokenizer does not know these words
        return other.fit_act(SOURCE, TARGET, **SETTINGS), scheduler


@pytest.mark.parametrize("name", ["HeunDiscreteScheduler", "KDPM2AncestralDiscreteScheduler"])
def test_second_order_schedulers_give_one_map_and_one_calibration_per_noise_level(
    tiny_pipe, scaled_levels, name
):
    import diffusers

    act_map, scheduler = _fit_with(tiny_pipe, getattr(diffusers, name))
    scheduler.set_timesteps(SETTINGS["num_inference_steps"])
    levels = sorted({round(float(t) / 1000, 4) for t in scheduler.timesteps})
    assert len(scheduler.timesteps) > len(levels)  # the scheduler does evaluate some levels twice
    assert [round(b, 4) for b in sorted(act_map.buckets)] == levels
    scaled = [level for level, _ in scaled_levels]
    assert len(scaled) == len(set(scaled)) == len(act_map.buckets)  # each level calibrated once
    # what the metadata records is what was applied: one gain per level, in the order the levels came
    assert act_map.metadata["calibration_gains"] == [round(gain, 4) for _, gain in scaled_levels]


def test_repeated_timesteps_are_one_level(tiny_pipe, scaled_levels):
    """More steps than training timesteps: trailing spacing repeats timesteps; each is fitted and scaled once."""
    from diffusers import EulerDiscreteScheduler

    settings = dict(SETTINGS, num_inference_steps=6)
    scheduler = EulerDiscreteScheduler.from_config(
        tiny_pipe.scheduler.config, num_train_timesteps=4, timestep_spacing="trailing"
    )
    scheduler.set_timesteps(6)
    distinct = len({float(t) for t in scheduler.timesteps})
    assert distinct < 6
    from act_core.diffusers import act_pipeline

    other = act_pipeline(type(tiny_pipe).from_pipe(tiny_pipe, scheduler=scheduler))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        act_map = other.fit_act(SOURCE, TARGET, **settings)
    assert len(act_map.buckets) == distinct
    scaled = [level for level, _ in scaled_levels]
    assert len(scaled) == len(set(scaled)) == distinct


def test_levels_equal_up_to_float_noise_are_one_bucket():
    """KDPM2 computes one timestep as 666.0001220703125 and once as 666.0: one level, one map."""
    from torch import nn

    from act_core.estimators import ModuleEstimator

    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    session = TrajectoryFit(
        {"model.1": model[1]}, ModuleEstimator("linear", "unbounded", "per_element"), num_pairs=2
    )
    x = torch.randn(4, 4)
    with session:
        for level in (0.6660001220703125, 0.666, 0.333):
            with session.call(level, source=slice(2, 4), target=slice(0, 2)):
                model(x)
            if level != 0.333:
                assert session.current_level == 0.6660001220703125
        act_map = session.result()
    assert act_map.buckets == (0.6660001220703125, 0.333)

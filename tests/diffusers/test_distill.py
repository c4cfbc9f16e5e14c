"""fold_to_static (issue 22): a time-aware cond-rows map distilled into one static map that folds, on the tiny
SDXL pipeline (random weights)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from act_core.diffusers.folding import fold_to_static
from act_core.distill import collapse_map
from act_core.errors import ACTInputError

SOURCE = ["a red circle", "a blue square", "a green triangle", "a red square"]
TARGET = [p + ", striped" for p in SOURCE]
SAMPLING = {"num_inference_steps": 3, "guidance_scale": 5.0, "height": 32, "width": 32}


@pytest.fixture(scope="module")
def time_aware_map(tiny_pipe):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny tokenizer does not know these words
        return tiny_pipe.fit_act(SOURCE, TARGET, progress=False, **SAMPLING)


@pytest.fixture(scope="module")
def static_map(tiny_pipe, time_aware_map):
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = fold_to_static(
            tiny_pipe,
            time_aware_map,
            SOURCE,
            steps=15,
            lr=0.002,  # the random-weight tiny UNet is far more sensitive than a trained one
            calls_per_step=2,
            prompts_per_call=2,
            progress=lambda step, steps, loss: losses.append(loss),
        )
    assert len(losses) == 15
    return result


def _image(pipe):
    return pipe(
        "a red circle",
        generator=torch.Generator().manual_seed(3),
        output_type="np",
        num_inference_steps=3,
        guidance_scale=5.0,
        height=32,
        width=32,
    ).images


def test_the_static_map_is_one_bucket_all_rows_and_foldable(tiny_pipe, time_aware_map, static_map):
    assert time_aware_map.buckets is not None and len(time_aware_map.buckets) == 3
    assert static_map.buckets is None
    assert static_map.metadata["cfg_rows"] == "all"
    assert set(static_map.modules) == set(time_aware_map.modules)
    assert all(m.foldable for m in static_map.modules.values())
    info = static_map.metadata["distilled"]
    assert info["states"] == 3 and info["steps"] == 15 and info["strength"] == 1.0
    assert info["loss_final"] < info["loss_initial"]
    assert tiny_pipe.act_map is None  # the teacher's hooks are gone


def test_its_hooks_and_fused_weights_give_the_same_image(tiny_pipe, static_map):
    plain = _image(tiny_pipe)
    tiny_pipe.enable_act(static_map, strength=1.0)  # cfg_rows from the map: all
    hooked = _image(tiny_pipe)
    tiny_pipe.disable_act()
    tiny_pipe.fuse_act(static_map, 1.0)
    try:
        fused = _image(tiny_pipe)
    finally:
        tiny_pipe.disable_act()
    np.testing.assert_allclose(fused, hooked, atol=1e-4)
    assert np.abs(hooked - plain).max() > 1e-3
    assert np.array_equal(_image(tiny_pipe), plain)


def test_collapse_scales_around_identity(time_aware_map):
    one = collapse_map(time_aware_map, 1.0)
    two = collapse_map(time_aware_map, 2.0)
    name = next(iter(one.modules))
    assert one.buckets is None and one.metadata["cfg_rows"] == "all"
    torch.testing.assert_close(two.modules[name].omega - 1, 2 * (one.modules[name].omega - 1))
    torch.testing.assert_close(two.modules[name].beta, 2 * one.modules[name].beta)
    expected = time_aware_map.modules[name].omega.mean(0)
    torch.testing.assert_close(one.modules[name].omega, expected)


def test_an_enabled_map_is_refused(tiny_pipe, time_aware_map, static_map):
    tiny_pipe.enable_act(static_map)
    try:
        with pytest.raises(ACTInputError, match="disable_act"):
            fold_to_static(tiny_pipe, time_aware_map, SOURCE, steps=1)
    finally:
        tiny_pipe.disable_act()


def test_a_diverging_fit_returns_its_starting_map(tiny_pipe, time_aware_map):
    from act_core.distill import collapse_map
    from act_core.errors import ACTWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.simplefilter("always", ACTWarning)
        with pytest.warns(ACTWarning, match="starting map is returned"):
            result = fold_to_static(
                tiny_pipe, time_aware_map, SOURCE[:2], init_gain=1.0, steps=3, lr=1.0, prompts_per_call=2
            )
    info = result.metadata["distilled"]
    assert info["kept_initial_map"] and info["loss_final"] == info["loss_initial"] < info["loss_fitted"]
    start = collapse_map(time_aware_map, 1.0)
    assert all(torch.equal(m.omega, start.modules[n].omega) for n, m in result.modules.items())

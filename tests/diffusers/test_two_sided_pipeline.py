"""Two-sided sliders in diffusers and the CLI (issue 20): one fit from three prompt lists, one file."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from act_core.errors import ACTInputError
from act_core.maps import ACTMap

SOURCE = ["a red circle", "a blue square", "a green triangle"]
MORE = [p + ", striped" for p in SOURCE]
LESS = [p + ", outlined" for p in SOURCE]
SETTINGS = {"num_inference_steps": 2, "guidance_scale": 4.0, "height": 32, "width": 32, "progress": False}


@pytest.fixture(scope="module")
def slider(tiny_pipe):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny tokenizer does not know these words
        return tiny_pipe.fit_act(SOURCE, MORE, less_prompts=LESS, **SETTINGS)


def _image(pipe) -> np.ndarray:
    return pipe(
        "a red circle", generator=torch.Generator().manual_seed(0), output_type="np", **SETTINGS
    ).images


def test_fit_act_with_less_prompts_gives_one_two_sided_map(tiny_pipe, slider, tmp_path):
    assert slider.two_sided and slider.metadata["two_sided"] and slider.metadata["num_less_prompts"] == 3
    assert slider.buckets == slider.less.buckets and list(slider.less.modules) == list(slider.modules)
    assert ACTMap.load(slider.save(tmp_path / "slider.safetensors")).equal(slider)
    plain = _image(tiny_pipe)
    images = {}
    for name, act_map, strength in (
        ("two-sided -1", slider, -1.0),
        ("less side +1", slider.side("less"), 1.0),
        ("two-sided +1", slider, 1.0),
        ("two-sided 0", slider, 0.0),
    ):
        tiny_pipe.enable_act(act_map, strength)
        images[name] = _image(tiny_pipe)
    tiny_pipe.disable_act()
    np.testing.assert_array_equal(images["two-sided -1"], images["less side +1"])
    np.testing.assert_array_equal(images["two-sided 0"], plain)
    assert np.abs(images["two-sided +1"] - images["two-sided -1"]).max() > 1e-3
    np.testing.assert_array_equal(_image(tiny_pipe), plain)


def test_less_prompts_must_differ_from_the_targets(tiny_pipe):
    with pytest.raises(ACTInputError, match="less prompts are the target prompts"):
        tiny_pipe.fit_act(SOURCE, MORE, less_prompts=list(MORE), **SETTINGS)
    with pytest.raises(ACTInputError, match="less prompt list"):
        tiny_pipe.fit_act(SOURCE, MORE, less_prompts=["only one"], **SETTINGS)


def test_a_two_sided_map_does_not_fuse(tiny_pipe, slider):
    with pytest.raises(ACTInputError, match="two-sided"):
        tiny_pipe.fuse_act(slider)
    assert tiny_pipe.act_map is None


def test_cli_fits_a_two_sided_map(tiny_sdxl_dir, tmp_path, capsys):
    from act_core.cli import main

    out = tmp_path / "slider.safetensors"
    args = ["fit", "--model", str(tiny_sdxl_dir), "--steps", "2", "--height", "32", "--width", "32", "-q"]
    for flag, prompts in (("--source-prompt", SOURCE), ("--target-prompt", MORE), ("--less-prompt", LESS)):
        for prompt in prompts:
            args += [flag, prompt]
    assert main([*args, "--output", str(out)]) == 0
    assert "two-sided" in capsys.readouterr().out
    assert ACTMap.load(out).two_sided

"""Two-sided sliders in ComfyUI (issue 20): the Fit node's optional less prompts give one map whose strength
-1 is the less side's map at +1 (skipped without COMFYUI_PATH)."""

from __future__ import annotations

import comfy_support as cs
import pytest
import torch
from comfy_support import comfyui  # noqa: F401  (session fixture)

pytestmark = cs.requires_comfyui
SOURCE = "\n".join(["a photo of a cat", "a photo of a dog", "a photo of a house"])
MORE = "\n".join(["a watercolor of a cat", "a watercolor of a dog", "a watercolor of a house"])
LESS = "\n".join(["a sketch of a cat", "a sketch of a dog", "a sketch of a house"])


def test_the_fit_node_fits_a_two_sided_slider_that_steers_both_ways(comfyui):  # noqa: F811
    model, clip = cs.build_tiny_sdxl(seed=0)
    nodes = cs.node_callers(cs.load_node_pack())
    with torch.inference_mode():
        act_map, summary = nodes["ACTFitMap"](
            model, clip, SOURCE, MORE, "default", "", "linear", "auto", "preset", 0, 64, 64, 3, 4,
            cfg=4.0, sampler_name="euler", scheduler="normal", less_prompts=LESS,
        )  # fmt: skip
    assert act_map.two_sided and "two-sided" in summary and len(act_map.less.buckets) == 3
    base = cs.sample_tiny(model, clip, "a photo of a cat", seed=1)
    outputs = {}
    for name, chosen, strength in (
        ("-1", act_map, -1.0),
        ("less", act_map.side("less"), 1.0),
        ("+1", act_map, 1.0),
    ):
        steered_model, steered_clip = nodes["ACTApply"].apply(model, clip, chosen, strength)
        outputs[name] = cs.sample_tiny(steered_model, steered_clip, "a photo of a cat", seed=1)
    assert torch.equal(outputs["-1"], outputs["less"])
    assert not torch.equal(outputs["-1"], base) and not torch.equal(outputs["+1"], outputs["-1"])
    zero_model, zero_clip = nodes["ACTApply"].apply(model, clip, act_map, 0.0)
    assert torch.equal(cs.sample_tiny(zero_model, zero_clip, "a photo of a cat", seed=1), base)


def test_an_empty_less_list_is_one_sided_and_a_one_line_list_is_refused(comfyui):  # noqa: F811
    from act_core.errors import ACTInputError

    model, clip = cs.build_tiny_sdxl(seed=0)
    fit = cs.node_callers(cs.load_node_pack())["ACTFitMap"]
    args = (model, clip, SOURCE, MORE, "default", "", "linear", "auto", "preset", 0, 64, 64, 2, 4)
    with torch.inference_mode():
        one_sided, _ = fit(*args, cfg=4.0, less_prompts="  \n ")
        assert not one_sided.two_sided
        with pytest.raises(ACTInputError, match="less prompt list has 1"):
            fit(*args, cfg=4.0, less_prompts="a sketch of a cat")

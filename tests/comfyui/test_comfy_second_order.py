"""The Fit node with ComfyUI's second-order samplers (Heun, DPM2): one map and one calibration per noise
level, as in diffusers (issue 17, item 5). Skipped without COMFYUI_PATH."""

from __future__ import annotations

import comfy_support as cs
import pytest
import torch
from comfy_support import comfyui  # noqa: F401  (session fixture)
from helpers import record_scale_steps

from act_core.trajectory import TrajectoryFit

pytestmark = cs.requires_comfyui
SOURCE = "\n".join(["a red circle", "a blue square", "a green triangle"])
TARGET = "\n".join(["a red circle, striped", "a blue square, striped", "a green triangle, striped"])
STEPS = 3


# Heun evaluates each step's next noise level for its correction (that level comes again as the next step's
# first evaluation); DPM2 evaluates a midpoint level, a level of its own.
@pytest.mark.parametrize(("sampler", "repeats"), [("heun", True), ("dpm_2", False)])
def test_second_order_samplers_give_one_map_and_one_calibration_per_noise_level(
    comfyui,  # noqa: F811
    monkeypatch,
    sampler,
    repeats,
):
    calls = record_scale_steps(monkeypatch)
    evaluated: list[float] = []
    original_call = TrajectoryFit.call

    def counting_call(self, level, **rows):
        if (
            rows.get("source") is not None
        ):  # one call of source rows per evaluation (the target rows run first)
            evaluated.append(float(level))
        return original_call(self, level, **rows)

    monkeypatch.setattr(TrajectoryFit, "call", counting_call)
    model, clip = cs.build_tiny_sdxl(seed=0)
    fit = cs.node_callers(cs.load_node_pack())["ACTFitMap"]
    with torch.inference_mode():
        act_map, _ = fit(
            model, clip, SOURCE, TARGET, "unet_norms", "", "linear", "auto", "preset", 0, 64, 64, STEPS, 4,
            cfg=4.0, sampler_name=sampler, scheduler="normal",
        )  # fmt: skip
    levels = set(evaluated)
    assert (len(evaluated) > len(levels)) == repeats
    assert len(act_map.buckets) == len(levels) and len(levels) >= STEPS
    scaled = [level for level, _ in calls]
    assert len(scaled) == len(set(scaled)) == len(levels)  # each level calibrated once
    assert act_map.metadata["calibration_gains"] == [round(gain, 4) for _, gain in calls]

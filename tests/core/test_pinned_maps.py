"""The fit workflow's maps stay what they were when pinned (``tests/pinned_maps.py``): restructuring the
workflow must not change what any host fits."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import comfy_support as cs  # noqa: E402
import pinned_maps  # noqa: E402
from comfy_support import comfyui  # noqa: E402,F401  (session fixture)

from act_core.maps import ACTMap  # noqa: E402

DIFFUSERS_CASES = [name for name in pinned_maps.CASES if not name.startswith("comfy_")]


@pytest.mark.parametrize("name", DIFFUSERS_CASES)
def test_diffusers_fits_equal_the_pinned_maps(name):
    """Every tensor within float32 rounding of the pinned one (``compare`` raises naming the module)."""
    fitted = pinned_maps.CASES[name]()
    pinned = ACTMap.load(pinned_maps.pinned_path(name))
    pinned_maps.compare(fitted, pinned, pinned_maps.LOOSE.get(name, (pinned_maps.RTOL, pinned_maps.ATOL)))


@cs.requires_comfyui
@pytest.mark.parametrize("name", ["comfy_fit_node", "comfy_fit_node_split_calls"])
def test_the_comfyui_fit_node_equals_its_pinned_map(comfyui, name):  # noqa: F811
    """Also split into calls of one pair (ComfyUI's source calls meet at every module): the same map."""
    fitted = pinned_maps.CASES[name]()
    assert fitted.metadata["causal_strategy"] == "exact"
    pinned_maps.compare(fitted, ACTMap.load(pinned_maps.pinned_path(name)))

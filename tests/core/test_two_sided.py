"""Two-sided maps (issue 20): one file, one slider; lambda < 0 applies the less side with |lambda|."""

from __future__ import annotations

import pytest
import torch
from helpers import Stack, random_map

from act_core.applying import apply_act, fold_act
from act_core.errors import ACTInputError, ACTMapFileError
from act_core.lora import check_foldable
from act_core.maps import ACTMap
from act_core.recording import select_modules

WIDTHS = {f"blocks.{i}.norm": 16 for i in range(4)}


def two_sided(seed: int = 0) -> ACTMap:
    more, less = random_map(WIDTHS, seed=seed), random_map(WIDTHS, seed=seed + 1)
    return ACTMap(more.modules, {"method": "linear"}, None, ACTMap(less.modules, {"side": "less"}))


def test_negative_strength_applies_the_less_side_with_its_magnitude():
    model = Stack(16, 4)
    modules = select_modules(model, ["*norm"])
    act_map, x = two_sided(), torch.randn(8, 16)
    outputs = {}
    for name, chosen, strength in (
        ("two_sided -1", act_map, -1.0),
        ("less +1", act_map.side("less"), 1.0),
        ("two_sided +0.5", act_map, 0.5),
        ("more +0.5", act_map.side("more"), 0.5),
        ("one_sided -1", act_map.side("more"), -1.0),
    ):
        handle = apply_act(modules, chosen, strength)
        with torch.no_grad():
            outputs[name] = model(x)
        handle.remove()
    torch.testing.assert_close(outputs["two_sided -1"], outputs["less +1"], rtol=0, atol=0)
    torch.testing.assert_close(outputs["two_sided +0.5"], outputs["more +0.5"], rtol=0, atol=0)
    assert not torch.equal(outputs["two_sided -1"], outputs["one_sided -1"])  # not an extrapolation
    with torch.no_grad():
        plain = model(x)
    handle = apply_act(modules, act_map, 0.0)
    with torch.no_grad():
        assert torch.equal(model(x), plain)
    handle.remove()


def test_a_two_sided_map_saves_loads_restricts_and_says_so(tmp_path):
    act_map = two_sided()
    path = act_map.save(tmp_path / "slider.safetensors")
    loaded = ACTMap.load(path)
    assert loaded.two_sided and loaded.equal(act_map) and loaded.less.metadata == {"side": "less"}
    assert "two-sided" in loaded.summary()
    part = loaded.restrict(names=["blocks.0.norm"])
    assert part.two_sided and list(part.less.modules) == ["blocks.0.norm"]
    assert not random_map(WIDTHS).two_sided and ACTMap.load(
        random_map(WIDTHS).save(tmp_path / "one.safetensors")
    )


def test_two_sided_maps_refuse_what_one_side_cannot_mean(tmp_path):
    act_map = two_sided()
    with pytest.raises(ACTInputError, match="do not compose"):
        act_map.compose(random_map(WIDTHS))
    with pytest.raises(ACTInputError, match="two-sided.*one side"):
        fold_act(select_modules(Stack(16, 4), ["*norm"]), act_map)
    with pytest.raises(ACTInputError, match="two-sided.*export one side"):
        check_foldable(act_map)
    with pytest.raises(ACTInputError, match="same modules"):
        ACTMap(act_map.modules, {}, None, ACTMap({"blocks.0.norm": act_map.less.modules["blocks.0.norm"]}))
    with pytest.raises(ACTInputError, match="one-sided"):
        random_map(WIDTHS).side("less")


def test_a_damaged_two_sided_file_is_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = two_sided().save(tmp_path / "slider.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        header = dict(handle.metadata())
        tensors = {k: handle.get_tensor(k) for k in handle.keys() if not k.startswith("less:blocks.3")}  # noqa: SIM118
    save_file(tensors, str(tmp_path / "cut.safetensors"), metadata=header)
    with pytest.raises(ACTMapFileError, match="tensor 'less:blocks.3.norm.omega' is missing"):
        ACTMap.load(tmp_path / "cut.safetensors")
    del header["less"]
    save_file(tensors, str(tmp_path / "noheader.safetensors"), metadata=header)
    with pytest.raises(ACTMapFileError, match="'less' header entry"):
        ACTMap.load(tmp_path / "noheader.safetensors")

"""ACTMap: save/load, file validation, composition, restriction, compatibility checks."""

import math
import os

import pytest
import torch
from helpers import random_map

from act_core.applying import apply_act
from act_core.errors import ACTInputError, ACTMapFileError, ACTModelMismatchError
from act_core.maps import ACTMap, ModuleMap, atomic_write

WIDTHS = {"unet.a.norm": 8, "unet.b.norm": 4, "text_encoder.layer_norm1": 6}


def test_save_then_load_gives_an_identical_map(tmp_path):
    act_map = random_map(WIDTHS, bounded=True)
    act_map.metadata["prompts"] = ("tuple", "becomes", "list")
    path = act_map.save(tmp_path / "style.safetensors")
    loaded = ACTMap.load(path)
    assert loaded.equal(ACTMap(act_map.modules, act_map.metadata))
    assert list(loaded.modules) == list(WIDTHS)
    assert not list(tmp_path.glob(".*.tmp")), "no temporary file left behind"


def test_truncated_file_is_reported(tmp_path):
    path = random_map(WIDTHS).save(tmp_path / "m.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ACTMapFileError, match="corrupted or truncated.*Re-save or re-fit"):
        ACTMap.load(path)


def test_corrupted_header_is_reported(tmp_path):
    path = random_map(WIDTHS).save(tmp_path / "m.safetensors")
    data = bytearray(path.read_bytes())
    data[8:20] = b"\xff" * 12
    path.write_bytes(bytes(data))
    with pytest.raises(ACTMapFileError, match="corrupted or truncated"):
        ACTMap.load(path)


def test_other_safetensors_and_missing_files_are_reported(tmp_path):
    from safetensors.torch import save_file

    other = tmp_path / "lora.safetensors"
    save_file({"x": torch.zeros(2)}, str(other))
    with pytest.raises(ACTMapFileError, match="not an ACT map"):
        ACTMap.load(other)
    with pytest.raises(ACTMapFileError, match="not found"):
        ACTMap.load(tmp_path / "missing.safetensors")
    with pytest.raises(ACTInputError, match=".safetensors"):
        random_map(WIDTHS).save(tmp_path / "map.pt")


def test_interrupted_write_leaves_nothing(tmp_path):
    target = tmp_path / "m.safetensors"

    def write(tmp):
        tmp.write_bytes(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, write)
    assert os.listdir(tmp_path) == []


def test_map_for_another_model_is_refused():
    act_map = random_map(WIDTHS)
    with pytest.raises(ACTModelMismatchError, match="missing.*Fit a map for this model"):
        act_map.check_compatible({"unet.a.norm": 8})
    with pytest.raises(ACTModelMismatchError, match="has 5 units but the map has 8"):
        act_map.check_compatible({"unet.a.norm": 5, "unet.b.norm": 4, "text_encoder.layer_norm1": 6})
    act_map.check_compatible(dict(WIDTHS))


def test_restrict_and_parts():
    act_map = random_map(WIDTHS)
    assert act_map.parts() == ["text_encoder", "unet"]
    assert list(act_map.restrict(parts=["unet"]).modules) == ["unet.a.norm", "unet.b.norm"]
    assert list(act_map.restrict(patterns=["*.b.*"]).modules) == ["unet.b.norm"]
    with pytest.raises(ACTInputError, match="No module"):
        act_map.restrict(parts=["vae"])


def test_compose_equals_sequential_application():
    torch.manual_seed(0)
    first, second = random_map({"n": 8}, seed=1), random_map({"n": 8}, seed=2)
    composed = first.compose(second)
    layer = torch.nn.Identity()
    modules = {"n": layer}
    x = torch.randn(5, 8)
    handle = apply_act(modules, first)
    once = layer(x)
    handle.remove()
    handle = apply_act(modules, second)
    sequential = layer(once)
    handle.remove()
    handle = apply_act(modules, composed)
    torch.testing.assert_close(layer(x), sequential, rtol=1e-5, atol=1e-6)
    handle.remove()


def test_compose_bounded_supports_intersect():
    ones = torch.ones(1)
    first = ACTMap({"n": ModuleMap(2 * ones, 0 * ones, -1 * ones, 1 * ones)})
    second = ACTMap({"n": ModuleMap(ones, ones, 0 * ones, 1 * ones)})
    module_map = first.compose(second).modules["n"]
    # First maps (-1, 1) to (-2, 2); second applies on (0, 1), i.e. first-input (0, 0.5).
    assert module_map.low.item() == 0.0 and module_map.high.item() == 0.5
    assert module_map.omega.item() == 2.0 and module_map.beta.item() == 1.0


def test_module_map_validation():
    with pytest.raises(ACTInputError, match="same length"):
        ModuleMap(torch.ones(3), torch.zeros(2), torch.zeros(3), torch.ones(3))
    with pytest.raises(ACTInputError, match="finite"):
        ModuleMap(torch.tensor([math.nan]), torch.zeros(1), torch.zeros(1), torch.ones(1))
    with pytest.raises(ACTInputError, match="at least one"):
        ACTMap({})

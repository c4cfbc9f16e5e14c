"""The folded default map in the user's paths (issue 22): ``pipe.fold_act``, ``pipe.fuse_act(map,
source_prompts=...)`` and ``act export-lora --source`` on the tiny SDXL pipeline."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from act_core.cli import main
from act_core.errors import ACTInputError
from act_core.lora import check_foldable
from act_core.maps import ACTMap

SOURCE = ["a red circle", "a blue square", "a green triangle"]
TARGET = [p + ", striped" for p in SOURCE]
SAMPLING = {"num_inference_steps": 2, "guidance_scale": 5.0, "height": 32, "width": 32}
FOLD = {"steps": 3, "prompts_per_call": 2}


@pytest.fixture(scope="module")
def timed_map(tiny_pipe):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny tokenizer does not know these words
        return tiny_pipe.fit_act(SOURCE, TARGET, progress=False, **SAMPLING)


def generate(pipe):
    generator = torch.Generator().manual_seed(0)
    return pipe("a red circle", output_type="np", generator=generator, **SAMPLING).images


def test_fold_act_gives_a_map_that_folds(tiny_pipe, timed_map):
    assert timed_map.buckets is not None
    with pytest.raises(ACTInputError, match="fold_act"):
        check_foldable(timed_map)  # the refusal names the way
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folded = tiny_pipe.fold_act(timed_map, SOURCE, progress=False, **FOLD)
    check_foldable(folded)
    assert folded.buckets is None and folded.metadata["cfg_rows"] == "all"
    assert sorted(folded.modules) == sorted(timed_map.modules)


def test_fuse_act_with_the_source_prompts_folds_the_default_map(tiny_pipe, timed_map):
    plain = generate(tiny_pipe)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tiny_pipe.fuse_act(timed_map, 1.0, source_prompts=SOURCE, fold_options=FOLD)
    try:
        assert np.abs(generate(tiny_pipe) - plain).max() > 1e-4
    finally:
        tiny_pipe.unfuse_act()
    assert np.array_equal(generate(tiny_pipe), plain)


def test_fuse_act_folds_along_the_prompts_the_map_records(tiny_pipe, timed_map):
    """A fit records its source prompts, so fuse_act folds the default's map without being given them: the
    same weights as with the prompts passed; a map that does not record them is refused, naming the fix."""
    assert timed_map.metadata["source_prompts"] == SOURCE
    weights = {}
    for name, prompts in (("recorded", None), ("given", SOURCE)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tiny_pipe.fuse_act(
                timed_map, 1.0, source_prompts=prompts, fold_options={**FOLD, "progress": False}
            )
        try:
            weights[name] = {k: v.clone() for k, v in tiny_pipe.unet.state_dict().items() if "norm" in k}
        finally:
            tiny_pipe.unfuse_act()
    for key, value in weights["given"].items():
        assert torch.equal(weights["recorded"][key], value), key
    anonymous = ACTMap(
        timed_map.modules,
        {k: v for k, v in timed_map.metadata.items() if k != "source_prompts"},
        timed_map.buckets,
    )
    with pytest.raises(ACTInputError, match="does not record the prompts it was fitted on.*source_prompts="):
        tiny_pipe.fuse_act(anonymous, 1.0)
    assert tiny_pipe.act_map is None


def test_export_lora_folds_a_time_aware_map_along_its_own_prompts(tiny_sdxl_dir, timed_map, tmp_path, capsys):
    timed = timed_map.save(tmp_path / "timed.safetensors")
    anonymous = ACTMap(
        timed_map.modules,
        {k: v for k, v in timed_map.metadata.items() if k != "source_prompts"},
        timed_map.buckets,
    ).save(tmp_path / "anonymous.safetensors")
    prompts = tmp_path / "source.txt"
    prompts.write_text("\n".join(SOURCE) + "\n")
    lora, folded = tmp_path / "lora.safetensors", tmp_path / "folded.safetensors"
    base = ["export-lora", "-q", "--model", str(tiny_sdxl_dir), "--output", str(lora), "--fold-steps", "3"]
    assert (
        main([*base, "--map", str(anonymous)]) == 2
    )  # records no prompts: refused before loading, naming --source
    assert "--source PROMPTS.txt" in capsys.readouterr().err
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main([*base, "--map", str(timed), "--save-folded", str(folded)]) == 0  # the map's own prompts
        by_record = ACTMap.load(folded)
        assert main([*base, "--map", str(timed), "--source", str(prompts), "--save-folded", str(folded)]) == 0
    keys = load_file(str(lora))
    assert len(keys) == 2 * len(timed_map)  # every norm: a weight and a bias diff
    given = ACTMap.load(folded)
    assert given.buckets is None and by_record.buckets is None
    for name, module_map in given.modules.items():
        assert torch.equal(by_record.modules[name].omega, module_map.omega)
    assert main([*base, "--map", str(folded), "--source", str(prompts)]) == 2  # a static map: nothing to fold
    assert "this map is static" in capsys.readouterr().err

"""Local-only pipeline loading: folders load, everything else fails with an error that names the fix."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from tiny_sdxl import build_tiny_sdxl

from act_core.errors import ACTError
from act_core.loading import ACTModelLoadError, load_pipeline
from act_core.pipeline import ACTPipelineMixin


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_sdxl_loading")
    build_tiny_sdxl(folder)
    return folder


def test_local_folder_loads_act_enabled(model_dir):
    pipe = load_pipeline(model_dir)
    assert isinstance(pipe, ACTPipelineMixin)
    assert type(pipe).__name__ == "ACTStableDiffusionXLPipeline"
    assert pipe.dtype == torch.float32 and hasattr(pipe, "fit_act")
    assert load_pipeline(str(model_dir), dtype=torch.bfloat16).dtype == torch.bfloat16


def test_hub_id_without_cache_names_the_fix(tmp_path):
    with pytest.raises(ACTModelLoadError) as info:
        load_pipeline("nobody-act-tests/no-such-model", cache_dir=tmp_path / "empty_cache")
    message = str(info.value)
    assert "No local copy of 'nobody-act-tests/no-such-model'" in message
    assert "huggingface-cli download nobody-act-tests/no-such-model" in message
    assert "local diffusers folder" in message
    assert isinstance(info.value, ACTError)


@pytest.mark.parametrize("missing", ["./no/such/folder", "/no/such/model.safetensors", "~/no-such-dir/x"])
def test_nonexistent_path_names_the_problem(missing):
    with pytest.raises(ACTModelLoadError, match="Model not found.*neither a folder nor a file"):
        load_pipeline(missing)


def test_folder_without_model_index(tmp_path):
    with pytest.raises(ACTModelLoadError, match="without model_index.json"):
        load_pipeline(tmp_path)


def test_unsupported_pipeline_class(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ACTModelLoadError, match="FluxPipeline.*supports StableDiffusionXLPipeline"):
        load_pipeline(tmp_path)


def test_pickled_checkpoint_refused_without_flag(tmp_path):
    checkpoint = tmp_path / "model.ckpt"
    checkpoint.write_bytes(b"not even read")
    with pytest.raises(ACTModelLoadError, match="pickles, which can run arbitrary code.*allow_pickle"):
        load_pipeline(checkpoint)


def test_single_file_without_cached_config(tmp_path):
    # Keys that diffusers recognises as an SDXL base checkpoint; its configs are not cached anywhere here.
    checkpoint = tmp_path / "sdxl.safetensors"
    key = "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias"
    save_file({"model.diffusion_model.out.2.bias": torch.zeros(4), key: torch.zeros(4)}, str(checkpoint))
    with pytest.raises(ACTModelLoadError) as info:
        load_pipeline(checkpoint, cache_dir=tmp_path / "empty_cache")
    message = str(info.value)
    assert "stabilityai/stable-diffusion-xl-base-1.0" in message and "never downloads" in message
    assert "--config" in message


def test_safetensors_that_is_not_a_checkpoint(tmp_path):
    lora = tmp_path / "lora.safetensors"
    save_file({"unet.conv_norm_out.diff": torch.zeros(4)}, str(lora))
    with pytest.raises(ACTModelLoadError, match="not a full Stable Diffusion checkpoint"):
        load_pipeline(lora)

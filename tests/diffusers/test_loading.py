"""Local-only pipeline loading: folders and single files load, the rest fails with an error naming the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from ldm_checkpoint import write_ldm_checkpoint
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_sdxl import build_tiny_sdxl, text_config
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from act_core.cli import main
from act_core.diffusers.loading import ACTModelLoadError, load_pipeline
from act_core.diffusers.pipeline import ACTPipelineMixin
from act_core.errors import ACTError
from act_core.maps import ACTMap


@pytest.fixture(scope="module")
def model_dir(tiny_sdxl_dir):
    return tiny_sdxl_dir


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
    assert "hf download nobody-act-tests/no-such-model" in message
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
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableCascadeCombinedPipeline"}))
    with pytest.raises(
        ACTModelLoadError, match="StableCascadeCombinedPipeline.*supports StableDiffusionXLPipeline"
    ):
        load_pipeline(tmp_path)


def test_flux_folder_loads_as_an_act_flux_pipeline(tmp_path):
    from tiny_flux import build_tiny_flux

    build_tiny_flux(tmp_path)
    pipe = load_pipeline(tmp_path)
    assert type(pipe).__name__ == "ACTFluxPipeline" and pipe.act_family.name == "flux"


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


# ------------------------------------------------------------------------------ single-file happy path
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def build_single_file_sdxl(folder: Path) -> StableDiffusionXLPipeline:
    """``build_tiny_sdxl`` with text encoders 24 and 40 wide (64 together, as the UNet expects).

    diffusers tells the two CLIP encoders of a single file apart only by their width (768 and 1280 in
    SDXL): with the tiny model's two 32-wide encoders it silently loads CLIP-L's weights into
    ``text_encoder_2`` and leaves its projection on the meta device.
    """
    pipe = build_tiny_sdxl(folder)
    encoders = {}
    for name, cls, width in (
        ("text_encoder", CLIPTextModel, 24),
        ("text_encoder_2", CLIPTextModelWithProjection, 40),
    ):
        config = text_config(len(getattr(pipe, name.replace("text_encoder", "tokenizer"))))
        config.hidden_size = width
        encoders[name] = cls(config)
    pipe = StableDiffusionXLPipeline(**{**pipe.components, **encoders})
    pipe.save_pretrained(str(folder))
    return pipe


@pytest.fixture(scope="module")
def single_file(tmp_path_factory) -> tuple[StableDiffusionXLPipeline, Path, Path]:
    """The folder pipeline, its diffusers folder (the config) and the same weights as one LDM file."""
    folder = tmp_path_factory.mktemp("tiny_sdxl_single_file")
    pipe = build_single_file_sdxl(folder / "diffusers")
    checkpoint = folder / "tiny_sdxl.safetensors"
    write_ldm_checkpoint(pipe, checkpoint)
    return pipe, folder / "diffusers", checkpoint


def test_written_checkpoint_has_the_original_sdxl_layout(single_file):
    _, _, checkpoint = single_file
    with safe_open(str(checkpoint), framework="pt") as handle:
        keys = set(handle.keys())
        in_proj = handle.get_slice(
            "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
        )
        assert in_proj.get_shape() == [3 * 40, 40]
        assert handle.get_slice("first_stage_model.encoder.mid.attn_1.q.weight").get_shape() == [32, 32, 1, 1]
    prefixes = {"model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.transformer."}
    prefixes.add("conditioner.embedders.1.model.")
    assert all(any(key.startswith(p) for p in prefixes) for key in keys)
    for key in (
        "model.diffusion_model.input_blocks.2.0.op.weight",  # down_blocks.0.downsamplers.0
        "model.diffusion_model.middle_block.1.transformer_blocks.1.attn2.to_k.weight",
        "model.diffusion_model.output_blocks.1.2.conv.weight",  # up_blocks.0.upsamplers.0
        "model.diffusion_model.label_emb.0.2.bias",
        "first_stage_model.decoder.up.0.block.1.conv2.weight",  # decoder.up_blocks.1 (reversed)
        "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight",
        "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
        "conditioner.embedders.1.model.text_projection",
        "conditioner.embedders.1.model.positional_embedding",
    ):
        assert key in keys, key


def test_single_file_with_config_loads_the_same_weights(single_file):
    pipe, config, checkpoint = single_file
    loaded = load_pipeline(checkpoint, config=config)
    assert isinstance(loaded, ACTPipelineMixin)
    assert type(loaded).__name__ == "ACTStableDiffusionXLPipeline" and hasattr(loaded, "fit_act")
    for name in COMPONENTS:
        expected, got = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert set(got) == set(expected), name
        for key, value in expected.items():
            assert got[key].device.type == "cpu" and torch.equal(got[key], value), f"{name}.{key}"
    assert type(loaded.scheduler) is type(pipe.scheduler)
    assert loaded.tokenizer_2.get_vocab() == pipe.tokenizer_2.get_vocab()


def test_single_file_with_unloaded_weights_is_refused(tmp_path):
    # The plain tiny model's two text encoders are both 32 wide, so diffusers cannot tell them apart in a
    # single file and leaves text_encoder_2's projection on the meta device without an error.
    pipe = build_tiny_sdxl(tmp_path / "diffusers")
    checkpoint = tmp_path / "equal_widths.safetensors"
    write_ldm_checkpoint(pipe, checkpoint)
    with pytest.raises(ACTModelLoadError) as info:
        load_pipeline(checkpoint, config=tmp_path / "diffusers")
    message = str(info.value)
    assert "did not fill" in message and "text_encoder_2" in message and "--config" in message


def test_cli_fit_from_single_file_matches_the_folder(single_file, tmp_path):
    _, config, checkpoint = single_file
    maps = {}
    for what, model in (("folder", config), ("file", checkpoint)):
        maps[what] = tmp_path / f"{what}.safetensors"
        argv = ["fit", "-q", "--model", str(model), "--source-prompt", "a red circle", "--source-prompt"]
        argv += ["a red dot", "--target-prompt", "a blue square", "--target-prompt", "a small blue square"]
        argv += ["--steps", "2", "--height", "32", "--width", "32", "--output", str(maps[what])]
        assert main([*argv, "--config", str(config)] if what == "file" else argv) == 0
    from_file, from_folder = ACTMap.load(maps["file"]), ACTMap.load(maps["folder"])
    assert from_file.metadata["model_source"] == str(checkpoint)
    assert list(from_file.modules) == list(from_folder.modules) and len(from_file) > 0
    assert all(from_file.modules[name].equal(m) for name, m in from_folder.modules.items())

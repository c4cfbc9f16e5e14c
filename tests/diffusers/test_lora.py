"""LoRA export of foldable ACT maps: keys ComfyUI's LoraLoader reads, and diffs that reproduce the hooks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from act_core.errors import ACTInputError
from act_core.lora import as_foldable, export_lora, lora_keys, lora_state_dict

SOURCE = [f"a red circle number {i}" for i in range(6)]
TARGET = [f"a blue square, striped, number {i}" for i in range(6)]
LAM = 0.7


@pytest.fixture(scope="module")
def pipe(tiny_pipe):
    yield tiny_pipe
    tiny_pipe.disable_act()


@pytest.fixture(scope="module")
def unet_map(pipe):
    return pipe.fit_act(SOURCE, TARGET, preset="unet_norms_foldable", batch_size=6, progress=False)


@pytest.fixture(scope="module")
def text_map(pipe):
    return pipe.fit_act(
        SOURCE, TARGET, preset="text_encoder_norms", support="unbounded", method="linear", progress=False
    )


def generate(pipe, prompt="a red circle"):
    # guidance 1: no CFG batch, so the UNet hooks (cond rows only) and weight diffs (all rows) agree.
    return pipe(
        prompt,
        num_inference_steps=2,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(0),
        height=32,
        width=32,
        output_type="np",
    ).images


def apply_lora_file(pipe, act_map, path, lam):
    """Add lam * diff to the parameters the keys name, as ComfyUI's LoraLoader does; returns originals."""
    modules = pipe.act_modules()
    by_key = {key: modules[name] for name, key in lora_keys(act_map, pipe).items()}
    originals = []
    with torch.no_grad():
        for key, diff in load_file(str(path)).items():
            stem, suffix = key.rsplit(".", 1)
            param = getattr(by_key[stem], {"diff": "weight", "diff_b": "bias"}[suffix])
            originals.append((param, param.detach().clone()))
            param.add_(lam * diff.float())
    return originals


def restore(originals):
    with torch.no_grad():
        for param, value in originals:
            param.copy_(value)


def check_keys_cover_every_module(pipe, act_map, path):
    state = load_file(str(path))
    modules = pipe.act_modules(act_map.parts())
    keys = lora_keys(act_map, pipe)
    expected = set()
    for name in act_map.modules:
        expected.add(keys[name] + ".diff")
        if modules[name].bias is not None:
            expected.add(keys[name] + ".diff_b")
    assert set(state) == expected
    for key, value in state.items():
        stem = key.rsplit(".", 1)[0]
        name = next(n for n in act_map.modules if keys[n] == stem)
        param = modules[name].weight if key.endswith(".diff") else modules[name].bias
        assert value.shape == param.shape


@pytest.mark.parametrize("which", ["unet", "text"])
def test_exported_diffs_reproduce_hooks(pipe, unet_map, text_map, tmp_path, which):
    act_map = unet_map if which == "unet" else text_map
    path = export_lora(act_map, pipe, tmp_path / "act_lora.safetensors", strength=1.0, dtype="fp32")
    check_keys_cover_every_module(pipe, act_map, path)
    if which == "unet":
        assert all(key.startswith("lora_unet_") for key in load_file(str(path)))
    else:
        prefixes = (
            "text_encoders.clip_l.transformer.text_model.",
            "text_encoders.clip_g.transformer.text_model.",
        )
        assert all(key.startswith(prefixes) for key in load_file(str(path)))

    base = generate(pipe)
    pipe.enable_act(act_map, strength=LAM)
    hooked = generate(pipe)
    pipe.disable_act()
    assert np.abs(hooked - base).max() > 1e-3  # the map does something at this strength

    originals = apply_lora_file(pipe, act_map, path, LAM)
    try:
        patched = generate(pipe)
    finally:
        restore(originals)
    np.testing.assert_allclose(patched, hooked, atol=1e-4)
    assert np.array_equal(generate(pipe), base)


def test_metadata_strength_and_fp16(pipe, unet_map, tmp_path):
    path = export_lora(unet_map, pipe, tmp_path / "half.safetensors", strength=0.5, dtype="fp16")
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
        keys = handle.keys()
        assert all(handle.get_tensor(key).dtype == torch.float16 for key in keys)
    assert meta["format"] == "act_lora" and float(meta["strength"]) == 0.5 and meta["dtype"] == "fp16"
    assert "LoraLoader" in meta["note"]
    assert json.loads(meta["act_map_metadata"])["preset"] == "unet_norms_foldable"
    # Diffs are linear in strength: half strength is half the full-strength diffs.
    full = lora_state_dict(unet_map, pipe, 1.0)
    half = load_file(str(path))
    for key, value in full.items():
        torch.testing.assert_close(half[key].float(), 0.5 * value, atol=1e-3, rtol=2e-3)


def test_bounded_map_is_refused(pipe, tmp_path):
    bounded = pipe.fit_act(SOURCE, TARGET, preset="unet_norms_first_step", batch_size=6, progress=False)
    with pytest.raises(ACTInputError, match="unet_norms_foldable"):
        export_lora(bounded, pipe, tmp_path / "bounded.safetensors")
    assert not (tmp_path / "bounded.safetensors").exists()


def test_text_encoder_preset_with_unbounded_support_is_foldable(pipe, text_map):
    # The preset fits per-element maps ((B, T, C) LayerNorm outputs), so unbounded ones fold as they are.
    assert text_map.metadata["apply_mode"] == "per_element" and text_map.foldable
    relabelled = as_foldable(text_map, pipe.act_modules(text_map.parts()))
    assert all(relabelled.modules[n].equal(m) for n, m in text_map.modules.items())


def test_bad_suffix_and_dtype(pipe, unet_map, tmp_path):
    with pytest.raises(ACTInputError, match=".safetensors"):
        export_lora(unet_map, pipe, tmp_path / "lora.pt")
    with pytest.raises(ACTInputError, match="fp16"):
        export_lora(unet_map, pipe, tmp_path / "lora.safetensors", dtype="int8")

"""The ACT nodes in real ComfyUI, in-process, on the tiny SDXL (skipped without COMFYUI_PATH).

Run: COMFYUI_PATH=/path/to/ComfyUI <comfy venv>/bin/python -m pytest tests/test_comfy_nodes.py
"""

import importlib
import os

import comfy_support as cs  # noqa: E402
import pytest
from comfy_support import comfyui  # noqa: E402,F401  (session fixture)

pytestmark = cs.requires_comfyui

SOURCE = "\n".join(
    f"a photo of a {thing}" for thing in ("cat", "dog", "house", "tree", "car", "boat", "bird", "lamp")
)
TARGET = "\n".join(
    f"a watercolor painting of a {thing}"
    for thing in ("cat", "dog", "house", "tree", "car", "boat", "bird", "lamp")
)
SIZE = 128  # pixels: a 16x16 latent for the tiny UNet


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def pack(comfyui):  # noqa: F811
    return cs.load_node_pack()


def _mod(pack, name):
    return importlib.import_module(f"{pack.__name__}.nodes.{name}")


@pytest.fixture(scope="module")
def nodes(pack):
    return cs.node_callers(pack)


def _fit(
    nodes, model, clip, preset="unet_norms_first_step", support="auto", mode="causal", strategy="auto", **kw
):
    import torch

    args = {
        "source_prompts": SOURCE,
        "target_prompts": TARGET,
        "preset": preset,
        "parts": "",
        "method": "linear",
        "support": support,
        "mode": mode,
        "fit_seed": 0,
        "width": SIZE,
        "height": SIZE,
        "steps": 4,
        "batch_size": 4,
        "causal_strategy": strategy,
    }
    args.update(kw)
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        act_map, summary = nodes["ACTFitMap"].fit(model, clip, **args)
    return act_map


@pytest.fixture(scope="module")
def tiny(comfyui):  # noqa: F811
    return cs.build_tiny_sdxl(seed=0)


@pytest.fixture(scope="module")
def maps(nodes, tiny):
    model, clip = tiny
    return {
        "unet": _fit(nodes, model, clip, "unet_norms_first_step"),
        "trajectory": _fit(nodes, model, clip, "unet_norms", mode="preset", cfg=5.0),
        "foldable": _fit(nodes, model, clip, "unet_norms_foldable"),
        "text": _fit(nodes, model, clip, "text_encoder_norms"),
        "text_unbounded": _fit(nodes, model, clip, "text_encoder_norms", support="unbounded"),
    }


@pytest.fixture()
def folders(tmp_path, monkeypatch, pack):
    """act_maps and loras in temporary folders (ComfyUI's folder_paths, in-process)."""
    import folder_paths

    act_maps, loras = tmp_path / "act_maps", tmp_path / "loras"
    act_maps.mkdir()
    loras.mkdir()
    table = dict(folder_paths.folder_names_and_paths)
    table["act_maps"] = ([str(act_maps)], {".safetensors"})
    table["loras"] = ([str(loras)], set(folder_paths.supported_pt_extensions))
    monkeypatch.setattr(folder_paths, "folder_names_and_paths", table)
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    return act_maps, loras


def _all_modules(model, clip):
    return list(model.model.diffusion_model.named_modules()) + list(clip.cond_stage_model.named_modules())


def _no_act_state(model, clip):
    """Nothing ACT left on the shared modules: no hooks of any kind, no handle attributes."""
    leftovers = [
        name
        for name, module in _all_modules(model, clip)
        if module._forward_hooks or module._forward_pre_hooks or hasattr(module, "_act_handle")
    ]
    return leftovers == []


def _snapshot(model, clip):
    return {
        "patches": {k: list(v) for k, v in model.patches.items()},
        "injections": dict(model.injections),
        "wrappers": {k: dict(v) for k, v in model.wrappers.items()},
        "clip_patches": {k: list(v) for k, v in clip.patcher.patches.items()},
        "clip_injections": dict(clip.patcher.injections),
    }


# ------------------------------------------------------------------------------------------ fitting
def test_fit_unet_map_has_canonical_names(maps, tiny, pack):
    model, clip = tiny
    act_map = maps["unet"]
    from act_core.families.sdxl import unet_module_table

    table = unet_module_table(_mod(pack, "comfy_models").key_table(model)())
    selected, _ = _mod(pack, "fitting").comfy_preset_modules(model, clip, "unet_norms_first_step", "")
    assert act_map.parts() == ["unet"]
    assert all(name.startswith("unet.") for name in act_map.modules)
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.0.norm1" in act_map.modules
    assert "unet.conv_norm_out" in act_map.modules
    assert set(act_map.modules) <= {f"unet.{d}" for d in table}
    assert set(act_map.modules) == set(selected) and len(act_map) == 51
    meta = act_map.metadata
    assert (
        meta["host"] == "comfyui"
        and meta["preset"] == "unet_norms_first_step"
        and meta["causal_strategy"] == "lockstep"
    )
    assert meta["support"] == "range" and meta["apply_mode"] == "spatial_mean"
    assert meta["num_source"] == meta["num_target"] == 8
    assert meta["sampling"] == {
        "height": SIZE,
        "width": SIZE,
        "steps": 4,
        "statistics_steps": 1,
        "guidance": "off (cond branch)",
    }
    assert maps["foldable"].foldable and not act_map.foldable


@pytest.mark.parametrize("mode, strategy", [("causal", "groupwise"), ("at_once", "auto")])
def test_other_strategies_agree_on_the_first_module(nodes, tiny, maps, mode, strategy):
    """The first module sees no earlier map, so every strategy fits it identically; later ones differ
    between causal and at-once fitting."""
    import torch

    model, clip = tiny
    other = _fit(nodes, model, clip, "unet_norms_first_step", mode=mode, strategy=strategy)
    lock = maps["unet"]
    assert list(other.modules) == list(lock.modules)
    first = next(iter(lock.modules))
    torch.testing.assert_close(other.modules[first].omega, lock.modules[first].omega, rtol=1e-5, atol=1e-5)
    if mode == "at_once":
        assert other.metadata["causal_strategy"] is None
        assert any(not other.modules[n].equal(lock.modules[n]) for n in lock.modules)
    else:
        assert other.metadata["causal_strategy"] == "groupwise"


def test_text_encoder_preset_runs_no_unet(nodes, tiny, maps):
    model, clip = tiny
    calls = []
    handle = model.model.diffusion_model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        act_map = _fit(nodes, model, clip, "text_encoder_norms")
    finally:
        handle.remove()
    assert calls == []
    assert act_map.parts() == ["text_encoder", "text_encoder_2"]
    names = set(act_map.modules)
    # SDXL reads clip_l's penultimate layer: its last layer and final LayerNorm are dead and skipped
    assert "text_encoder.text_model.encoder.layers.2.layer_norm1" not in names
    assert "text_encoder.text_model.final_layer_norm" not in names
    assert "text_encoder_2.text_model.encoder.layers.2.layer_norm1" in names
    assert "text_encoder_2.text_model.final_layer_norm" in names
    assert len(names) == 4 + 7
    assert all(act_map.modules[n].equal(maps["text"].modules[n]) for n in names)  # deterministic


@pytest.mark.parametrize(
    "change, message",
    [
        ({"source_prompts": ""}, "source prompt list has 0"),
        ({"target_prompts": "only one line\n\n   \n"}, "target prompt list has 1"),
        (
            {"source_prompts": SOURCE + "\nx", "target_prompts": "a\nb"},
            "Unbalanced prompt lists: 9 source vs 2",
        ),
        ({"parts": "text_encoder"}, "Preset 'unet_norms_first_step' hooks unet, not text_encoder"),
        ({"parts": "vae"}, "Unknown part"),
        ({"width": 100}, "multiples of 8"),
        ({"support": "q60-40"}, "Unknown support"),
    ],
)
def test_fit_validates_inputs(nodes, tiny, change, message):
    from act_core.errors import ACTInputError

    model, clip = tiny
    with pytest.raises(ACTInputError, match=message):
        _fit(nodes, model, clip, **change)


@pytest.mark.parametrize("preset", ["unet_norms_first_step", "unet_norms", "text_encoder_norms"])
def test_interrupted_fit_leaves_no_hooks_and_no_file(nodes, preset, folders):
    """ComfyUI's interrupt flag set mid-fit: a clean InterruptProcessingException, no hooks, nothing saved."""
    import comfy.model_management as mm

    act_maps, _ = folders
    model, clip = cs.build_tiny_sdxl(seed=0)
    probe = (
        model.model.diffusion_model.input_blocks[1][0].in_layers[0]
        if preset.startswith("unet_norms")
        else clip.cond_stage_model.clip_g.transformer.text_model.encoder.layers[1].layer_norm1
    )
    seen = []

    def set_flag(module, args, output):
        seen.append(1)
        if len(seen) == 2:
            mm.interrupt_current_processing(True)

    handle = probe.register_forward_hook(set_flag)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            act_map = _fit(nodes, model, clip, preset)
            nodes["ACTSaveMap"].save(act_map, "never_saved", False)  # what the executor would run next
    finally:
        handle.remove()
        mm.interrupt_current_processing(False)
    assert len(seen) >= 2
    assert _no_act_state(model, clip)
    assert list(act_maps.rglob("*")) == []
    # and the model still fits normally afterwards
    assert len(_fit(nodes, model, clip, preset)) > 0


# ------------------------------------------------------------------------------------------ applying
@pytest.mark.parametrize("kind", ["unet", "foldable", "text"])
def test_apply_strength_zero_exact_one_differs_inputs_untouched(nodes, maps, kind):
    model, clip = cs.build_tiny_sdxl(seed=0)
    base = cs.sample_tiny(model, clip, "a cat on a sofa", seed=3)
    before = _snapshot(model, clip)
    weights = {k: v.clone() for k, v in model.model_state_dict().items()}
    clip_weights = {k: v.clone() for k, v in clip.get_sd().items() if hasattr(v, "clone")}

    m0, c0 = nodes["ACTApply"].apply(model, clip, maps[kind], 0.0)
    assert cs.sample_tiny(m0, c0, "a cat on a sofa", seed=3).equal(base)
    m1, c1 = nodes["ACTApply"].apply(model, clip, maps[kind], 1.0)
    assert m1 is not model and c1 is not clip
    steered = cs.sample_tiny(m1, c1, "a cat on a sofa", seed=3)
    assert not steered.equal(base) and bool(steered.isfinite().all())
    if kind == "foldable":
        assert len(m1.patches) == 2 * len(maps[kind]) and not m1.injections
    elif kind == "unet":
        assert len(m1.injections) == 1 and not m1.patches
    else:
        assert len(c1.patcher.injections) == 1 and not m1.injections and not m1.patches

    # the inputs: same patches/injections/wrappers, same weights, same samples, nothing left hooked
    assert _snapshot(model, clip) == before
    assert cs.sample_tiny(model, clip, "a cat on a sofa", seed=3).equal(base)
    assert all(v.equal(weights[k]) for k, v in model.model_state_dict().items())
    assert all(v.equal(clip_weights[k]) for k, v in clip.get_sd().items() if k in clip_weights)
    assert _no_act_state(model, clip)
    # the steered clone still gives the same result after the original was loaded in between
    assert cs.sample_tiny(m1, c1, "a cat on a sofa", seed=3).equal(steered)


def test_hooks_act_on_cond_rows_only_and_respect_the_window(maps, pack):
    import torch

    applying = _mod(pack, "applying")
    model, clip = cs.build_tiny_sdxl(seed=0)
    foldable = maps["foldable"]
    base = cs.sample_tiny(model, clip, "a cat", seed=5, cfg=5.0)

    def run(cfg, **kw):
        m, c, how = applying.apply_map(model, clip, foldable, 0.8, **kw)
        return cs.sample_tiny(m, c, "a cat", seed=5, cfg=cfg), how

    patched1, how = run(1.0)
    hooked1, how_h = run(1.0, force_hooks=True)
    assert how == {"unet": "weight patches"} and how_h == {"unet": "hooks"}
    # cfg 1 runs the cond branch only: hooks and weight patches are the same affine map
    torch.testing.assert_close(hooked1, patched1, rtol=1e-4, atol=1e-4)
    # with CFG, weight patches steer both branches, hooks only the cond rows
    patched5, _ = run(5.0)
    hooked5, _ = run(5.0, force_hooks=True)
    assert (hooked5 - patched5).abs().max() > 1e-3
    # a window makes a difference, and an empty window is exactly the plain model
    late, how_w = run(5.0, start_percent=0.5, end_percent=1.0)
    assert how_w == {"unet": "hooks"}
    assert not late.equal(hooked5) and not late.equal(base)
    never, _ = run(5.0, start_percent=0.0, end_percent=0.0)
    assert never.equal(base)


def test_cond_rows_helper(pack):
    import torch

    cond_rows = _mod(pack, "applying").cond_rows
    assert cond_rows([0], 2) == (True, None)
    assert cond_rows([1, 0], 4) == (True, slice(2, 4))
    assert cond_rows([0, 1], 4) == (True, slice(0, 2))
    assert cond_rows([1], 2) == (False, None)
    enabled, rows = cond_rows([0, 1, 0], 3)
    assert enabled and torch.equal(rows, torch.tensor([0, 2]))


def test_separate_text_encoder_strength(nodes, maps):
    from act_core.maps import ACTMap

    model, clip = cs.build_tiny_sdxl(seed=0)
    both = ACTMap({**maps["unet"].modules, **maps["text"].modules}, {"method": "linear"})
    base = cs.sample_tiny(model, clip, "a cat", seed=2)
    unet_only = nodes["ACTApply"].apply(model, clip, both, 1.0, True, 0.0)
    assert not unet_only[1].patcher.injections and unet_only[0].injections
    text_only = nodes["ACTApply"].apply(model, clip, both, 0.0, True, 1.0)
    assert text_only[1].patcher.injections and not text_only[0].injections
    assert not cs.sample_tiny(*text_only, "a cat", seed=2).equal(base)
    assert cs.sample_tiny(*nodes["ACTApply"].apply(model, clip, both, 0.0, True, 0.0), "a cat", seed=2).equal(
        base
    )


def test_apply_refuses_a_map_of_another_model(nodes, maps):
    from act_core.errors import ACTModelMismatchError
    from act_core.maps import ACTMap, ModuleMap

    model, clip = cs.build_tiny_sdxl(seed=0)
    name = "unet.down_blocks.1.attentions.0.transformer_blocks.0.norm1"
    wrong = ACTMap({name: ModuleMap([1.0] * 7, [0.0] * 7, [-1.0] * 7, [1.0] * 7)}, {"model": "other"})
    with pytest.raises(ACTModelMismatchError, match="has 64 units but the map has 7"):
        nodes["ACTApply"].apply(model, clip, wrong, 1.0)
    missing = ACTMap({"unet.no.such.norm": ModuleMap([1.0], [0.0], [-1.0], [1.0])}, {})
    with pytest.raises(ACTModelMismatchError, match="modules are missing"):
        nodes["ACTApply"].apply(model, clip, missing, 1.0)


def test_sweep_renders_one_latent_per_lambda(nodes, maps):
    import torch

    model, clip = cs.build_tiny_sdxl(seed=0)
    latent = {"samples": torch.zeros((1, 4, 16, 16))}
    out, labels = nodes["ACTSweep"].sweep(
        model, clip, maps["unet"], latent, "a cat", "", "0, 1,1.5", 7, 2, 5.0, "euler", "normal", 1.0
    )
    assert labels == "0, 1, 1.5" and out["samples"].shape == (3, 4, 16, 16)
    assert out["samples"][0:1].equal(cs.sample_tiny(model, clip, "a cat", seed=7))
    m1, c1 = nodes["ACTApply"].apply(model, clip, maps["unet"], 1.0)
    assert out["samples"][1:2].equal(cs.sample_tiny(m1, c1, "a cat", seed=7))
    assert not out["samples"][2].equal(out["samples"][1])


# ------------------------------------------------------------------------------------------ files
def test_save_load_round_trip_and_refused_names(nodes, maps, folders):
    from act_core.errors import ACTInputError

    act_maps, _ = folders
    out = nodes["ACTSaveMap"].save(maps["unet"], "styles/watercolor", False)
    assert out["result"] == ("styles/watercolor.safetensors",)
    assert (act_maps / "styles" / "watercolor.safetensors").is_file()
    assert [p.name for p in act_maps.rglob("*")] == [
        "styles",
        "watercolor.safetensors",
    ]  # atomic: no temp file
    kind, options = nodes["ACTLoadMap"].INPUT_TYPES()["required"]["act_map_name"]
    listed = options["options"] if kind == "COMBO" else kind
    assert listed == ["styles/watercolor.safetensors"]
    loaded, summary = nodes["ACTLoadMap"].load("styles/watercolor.safetensors")
    assert loaded.equal(maps["unet"]) and "51 modules" in summary
    assert nodes["ACTLoadMap"].fingerprint_inputs(act_map_name="styles/watercolor.safetensors")

    with pytest.raises(ACTInputError, match="already exists"):
        nodes["ACTSaveMap"].save(maps["unet"], "styles/watercolor.safetensors", False)
    nodes["ACTSaveMap"].save(maps["foldable"], "styles/watercolor.safetensors", True)
    assert nodes["ACTLoadMap"].load("styles/watercolor.safetensors")[0].equal(maps["foldable"])

    for bad in (
        "../escape",
        "a/../../b",
        "/etc/passwd",
        "C:\\maps\\x",
        "..",
        "",
        "  ",
        ".hidden",
        "a//b",
        "x.ckpt",
        "a\0b",
    ):
        with pytest.raises(ACTInputError):
            nodes["ACTSaveMap"].save(maps["unet"], bad, True)
        with pytest.raises(ACTInputError):
            nodes["ACTLoadMap"].load(bad)
    assert {p.name for p in act_maps.parent.iterdir()} == {"act_maps", "loras"}
    with pytest.raises(ACTInputError, match="not found"):
        nodes["ACTLoadMap"].load("missing.safetensors")


def test_act_maps_folder_registration_merges_existing_paths(pack, monkeypatch, tmp_path):
    import folder_paths

    folders = _mod(pack, "folders")
    table = dict(folder_paths.folder_names_and_paths)
    table["act_maps"] = ([str(tmp_path / "user_maps")], set())  # as extra_model_paths.yaml registers it
    monkeypatch.setattr(folder_paths, "folder_names_and_paths", table)
    assert folders.register_act_maps_folder()
    assert folders.register_act_maps_folder()  # idempotent
    paths, extensions = folder_paths.folder_names_and_paths["act_maps"]
    assert paths == [str(tmp_path / "user_maps"), os.path.join(folder_paths.models_dir, "act_maps")]
    assert extensions == {".safetensors"}
    del table["act_maps"]
    assert folders.register_act_maps_folder()
    assert folder_paths.folder_names_and_paths["act_maps"] == (
        [os.path.join(folder_paths.models_dir, "act_maps")],
        {".safetensors"},
    )


@pytest.mark.parametrize("dtype, tol", [("fp32", 1e-4), ("fp16", 5e-2)])
def test_exported_lora_reproduces_apply(nodes, maps, folders, pack, dtype, tol):
    """A foldable map (UNet + text encoders) exported as LoRA and loaded by the stock LoraLoader node with
    strength lambda gives the same sample as Apply ACT at lambda."""
    import torch
    from safetensors import safe_open

    import nodes as comfy_nodes
    from act_core.maps import ACTMap

    _, loras = folders
    model, clip = cs.build_tiny_sdxl(seed=0)
    both = ACTMap({**maps["foldable"].modules, **maps["text_unbounded"].modules}, {"method": "linear"})
    out = nodes["ACTExportLoRA"].export(model, clip, both, "act/style", dtype, False)
    assert out["result"] == ("act/style.safetensors",)
    with safe_open(str(loras / "act" / "style.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.metadata()["format"] == "act_lora"
    assert "lora_unet_out_0.diff" in keys  # kohya's key of conv_norm_out, which A1111 and Forge read too
    assert "text_encoders.clip_l.transformer.text_model.encoder.layers.0.layer_norm1.diff_b" in keys
    assert len(keys) == 2 * len(both)

    lam = 0.7
    lora_model, lora_clip = comfy_nodes.LoraLoader().load_lora(model, clip, "act/style.safetensors", lam, lam)
    assert len(lora_model.patches) == 2 * len(maps["foldable"])
    assert len(lora_clip.patcher.patches) == 2 * len(maps["text_unbounded"])
    act_model, act_clip = nodes["ACTApply"].apply(model, clip, both, lam)
    assert len(act_model.patches) == len(lora_model.patches) and not act_clip.patcher.injections
    via_lora = cs.sample_tiny(lora_model, lora_clip, "a cat", seed=4)
    via_act = cs.sample_tiny(act_model, act_clip, "a cat", seed=4)
    base = cs.sample_tiny(model, clip, "a cat", seed=4)
    scale = (via_act - base).abs().max()
    assert scale > 1e-2
    torch.testing.assert_close(via_lora, via_act, rtol=tol, atol=tol * float(scale))
    # and against the hooks (no folding at all), at cfg 1 where hooks act on every row
    hook_model, hook_clip, _ = _mod(pack, "applying").apply_map(model, clip, both, lam, force_hooks=True)
    torch.testing.assert_close(
        cs.sample_tiny(lora_model, lora_clip, "a cat", seed=4, cfg=1.0),
        cs.sample_tiny(hook_model, hook_clip, "a cat", seed=4, cfg=1.0),
        rtol=tol,
        atol=tol * float(scale),
    )


def test_export_refuses_non_foldable_map(nodes, maps, folders):
    from act_core.errors import ACTInputError

    _, loras = folders
    model, clip = cs.build_tiny_sdxl(seed=0)
    with pytest.raises(ACTInputError, match="unet_norms_foldable"):
        nodes["ACTExportLoRA"].export(model, clip, maps["unet"], "nope", "fp16", False)
    assert list(loras.iterdir()) == []


def test_lora_export_is_relative_to_checkpoint_weights(nodes, maps, folders):
    """Diffs come from the checkpoint's weights even while another steered clone is loaded."""
    from safetensors.torch import load_file

    _, loras = folders
    model, clip = cs.build_tiny_sdxl(seed=0)
    nodes["ACTExportLoRA"].export(model, clip, maps["foldable"], "first", "fp32", False)
    steered, steered_clip = nodes["ACTApply"].apply(model, clip, maps["foldable"], 1.5)
    cs.sample_tiny(steered, steered_clip, "a cat", seed=1)  # the shared module now holds patched weights
    nodes["ACTExportLoRA"].export(model, clip, maps["foldable"], "second", "fp32", False)
    a, b = load_file(str(loras / "first.safetensors")), load_file(str(loras / "second.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


# ------------------------------------------------------------------------------------------ portability
FULL_SDXL_UNET = dict(
    cs.TINY_UNET,
    model_channels=320,
    num_res_blocks=[2, 2, 2],
    channel_mult=[1, 2, 4],
    transformer_depth=[0, 0, 2, 2, 10, 10],
    transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
    transformer_depth_middle=10,
    num_head_channels=64,
    context_dim=2048,
    adm_in_channels=2816,
)


def test_canonical_names_round_trip_full_sdxl(comfyui):  # noqa: F811
    """Every norm of diffusers' SDXL UNet has a ComfyUI module of the same type and width, and back."""
    import comfy.supported_models
    import comfy.utils
    import torch

    from act_core.families.sdxl import (
        comfy_unet_key,
        comfy_unet_modules,
        component_modules,
        unet_module_table,
    )
    from act_core.presets import NORM_TYPES

    diffusers = pytest.importorskip("diffusers")
    config = comfy.supported_models.SDXL(dict(FULL_SDXL_UNET))
    with torch.device("meta"):
        comfy_unet = config.get_model({}).diffusion_model
        diffusers_unet = diffusers.UNet2DConditionModel(
            sample_size=128,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            transformer_layers_per_block=(1, 2, 10),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
    table = unet_module_table(comfy.utils.unet_to_diffusers(config.unet_config))
    diff_norms = {
        n: m
        for n, m in component_modules("unet", diffusers_unet).items()
        if isinstance(m, NORM_TYPES) and "norm" in n.split(".", 1)[1]
    }
    comfy_norms = {
        n: m for n, m in comfy_unet_modules(comfy_unet, table).items() if isinstance(m, NORM_TYPES)
    }
    assert len(diff_norms) == 256
    assert set(diff_norms) == {n for n in comfy_norms if "norm" in n.split(".", 1)[1]}
    comfy_named = dict(comfy_unet.named_modules())
    for name, module in diff_norms.items():
        comfy_name = comfy_unet_key(name, table)
        assert comfy_name.startswith("diffusion_model.")
        twin = comfy_named[comfy_name.removeprefix("diffusion_model.")]
        assert isinstance(twin, type(module))  # ComfyUI's ops subclass torch's GroupNorm / LayerNorm
        assert twin.weight.shape == module.weight.shape
        assert comfy_norms[name] is twin  # and back: the ComfyUI module carries this canonical name
    assert comfy_unet_key("unet.down_blocks.1.attentions.0.transformer_blocks.0.norm1", table) == (
        "diffusion_model.input_blocks.4.1.transformer_blocks.0.norm1"
    )
    assert comfy_unet_key("unet.conv_norm_out", table) == "diffusion_model.out.0"


def _diffusers_twin(clip):
    """A diffusers SDXL pipeline whose text encoders carry the tiny ComfyUI CLIP's weights and tokenizer."""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    from act_core.diffusers import act_pipeline

    tokenizer_dir = os.path.join(cs.comfy_path(), "comfy", "sd1_tokenizer")
    tok1 = transformers.CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=77)
    tok2 = transformers.CLIPTokenizer.from_pretrained(tokenizer_dir, pad_token="!", model_max_length=77)

    def config(sizes, act):
        return transformers.CLIPTextConfig(
            vocab_size=49408,
            max_position_embeddings=77,
            hidden_act=act,
            layer_norm_eps=1e-5,
            bos_token_id=0,
            eos_token_id=49407,
            pad_token_id=1,
            **sizes,
        )

    te1 = transformers.CLIPTextModel(config(cs.TINY_CLIP_L, "quick_gelu"))
    te2 = transformers.CLIPTextModelWithProjection(config(cs.TINY_CLIP_G, "gelu"))
    for hf, comfy_encoder in ((te1, clip.cond_stage_model.clip_l), (te2, clip.cond_stage_model.clip_g)):
        wanted = set(hf.state_dict())
        state = {}
        for key, value in comfy_encoder.transformer.state_dict().items():
            for candidate in (key, key.removeprefix("text_model.")):
                if candidate in wanted:
                    state[candidate] = value
                    break
        assert set(state) == wanted
        hf.load_state_dict(state)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + cs.TINY_CLIP_G["projection_dim"],
        cross_attention_dim=cs.TINY_UNET["context_dim"],
        norm_num_groups=8,
    )
    vae = diffusers.AutoencoderKL(
        block_out_channels=[16],
        down_block_types=["DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=te1,
        text_encoder_2=te2,
        tokenizer=tok1,
        tokenizer_2=tok2,
        unet=unet,
        scheduler=diffusers.EulerDiscreteScheduler(),
    )
    return act_pipeline(pipe)


def test_text_encoder_map_fitted_in_diffusers_applies_in_comfyui(nodes, maps, pack):
    """Same CLIP weights in diffusers and ComfyUI: the diffusers-fitted map equals the ComfyUI-fitted one, and
    applied in ComfyUI it gives the conditioning diffusers gives with the map enabled."""
    import torch

    model, clip = cs.build_tiny_sdxl(seed=0)
    pipe = _diffusers_twin(clip)
    prompt = "a photo of a lighthouse on a cliff"

    def diffusers_embeds():
        with torch.no_grad():
            embeds, _, pooled, _ = pipe.encode_prompt(
                prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
            )
        return embeds, pooled

    def comfy_embeds(c):
        cond = cs.encode(c, prompt)[0]
        return cond[0], cond[1]["pooled_output"]

    base_d, base_c = diffusers_embeds(), comfy_embeds(clip)
    for a, b in zip(base_d, base_c, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)

    fitted = pipe.fit_act(
        SOURCE.splitlines(), TARGET.splitlines(), preset="text_encoder_norms", progress=False
    )
    comfy_fitted = maps["text"]
    assert set(fitted.modules) == set(comfy_fitted.modules)
    for name in fitted.modules:
        for field in ("omega", "beta", "low", "high"):
            torch.testing.assert_close(
                getattr(fitted.modules[name], field),
                getattr(comfy_fitted.modules[name], field),
                rtol=1e-3,
                atol=1e-3,
            )

    _, steered_clip = nodes["ACTApply"].apply(model, clip, fitted, 1.0)
    pipe.enable_act(fitted, 1.0)
    steered_d, steered_c = diffusers_embeds(), comfy_embeds(steered_clip)
    pipe.disable_act()
    assert (steered_d[0] - base_d[0]).abs().max() > 0.1
    for a, b in zip(steered_d, steered_c, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_case17_apply_logs_the_parts_it_leaves_out(nodes, maps, caplog):
    """Issue 9, case 17: a part Apply ACT does not apply is named in the log."""
    import logging

    from act_core import ACTMap

    model, clip = cs.build_tiny_sdxl(seed=0)
    both = ACTMap({**maps["unet"].modules, **maps["text"].modules}, {"method": "linear"})
    with caplog.at_level(logging.INFO, logger="ComfyUI-ACT"):
        nodes["ACTApply"].apply(model, clip, both, 0.0, True, 1.0)
    assert any("unet part(s) left out" in r.getMessage() for r in caplog.records)


def test_trajectory_map_from_the_fit_node_is_time_aware_and_steers(nodes, maps):
    model, clip = cs.build_tiny_sdxl(seed=0)
    act_map = maps["trajectory"]
    meta = act_map.metadata
    assert (
        meta["protocol"] == "trajectory" and meta["cfg_rows"] == "cond" and meta["causal_strategy"] == "exact"
    )
    assert meta["sampling"]["cfg"] == 5.0 and meta["sampling"]["sampler_name"] == "euler"
    assert act_map.buckets is not None and len(act_map.buckets) == 4  # one per sampler step
    assert max(act_map.buckets) > 0.9  # the first step is (nearly) pure noise
    base = cs.sample_tiny(model, clip, "a cat", seed=2)
    m0, c0 = nodes["ACTApply"].apply(model, clip, act_map, 0.0)
    assert cs.sample_tiny(m0, c0, "a cat", seed=2).equal(base)
    m1, c1 = nodes["ACTApply"].apply(model, clip, act_map, 1.0)
    assert not cs.sample_tiny(m1, c1, "a cat", seed=2).equal(base)

"""The Fold node (issue 22) in real ComfyUI on the shipped shapes SDXL model: the Fit node's default map,
folded by ComfyUI's own sampler into one static map, exports through the Export node as a LoRA the stock
LoraLoader loads whole and that samples what Apply ACT gives with the folded map; the ComfyUI host and the
diffusers host fold the same map on the same model to maps that steer alike; bad inputs are refused naming
the fix (skipped without COMFYUI_PATH).

Small on purpose: 3 prompts, 4 sampling steps at the model's own 32 px, 20 Adam steps (the library's 200
steps fit the same way, longer)."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

import comfy_support as cs  # noqa: E402
import pytest
import torch
from comfy_support import comfyui  # noqa: E402,F401  (session fixture)

pytestmark = cs.requires_comfyui

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "models" / "shapes-sdxl"
SOURCE = ["a red circle", "a blue square", "a green triangle"]
TARGET = [f"{prompt}, striped" for prompt in SOURCE]
SOURCE_TEXT = "\n".join(SOURCE)  # the Fold node's multiline input, one prompt per line
STEPS, CFG, SAMPLER, SCHEDULER = 4, 3.0, "euler", "simple"
PIXELS = 64  # ComfyUI's nodes assume an 8x VAE: 64 gives the shapes model's 8 x 8 latent (its 32 px images)
FOLD_STEPS = 20
SAMPLE = {"steps": STEPS, "cfg": CFG, "size": (8, 8), "scheduler": SCHEDULER}


@pytest.fixture(scope="module")
def pack(comfyui):  # noqa: F811
    return cs.load_node_pack()


@pytest.fixture(scope="module")
def nodes(pack):
    return cs.node_callers(pack)


@pytest.fixture(scope="module")
def shipped(comfyui):  # noqa: F811
    import comfy_shapes

    return comfy_shapes.load_unet(SHIPPED), comfy_shapes.load_clip(SHIPPED)


def fold_args(act_map, source=SOURCE_TEXT, negative="", fold_steps=FOLD_STEPS):
    """The Fold node's inputs, in its schema's order, with the Fit node's sampler settings."""
    return (act_map, source, 0, PIXELS, PIXELS, STEPS, CFG, SAMPLER, SCHEDULER, negative, fold_steps)


@pytest.fixture(scope="module")
def fitted(nodes, shipped):
    model, clip = shipped
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        act_map, _ = nodes["ACTFitMap"](
            model,
            clip,
            "\n".join(SOURCE),
            "\n".join(TARGET),
            "default",
            "",
            "linear",
            "auto",
            "preset",
            0,
            PIXELS,
            PIXELS,
            STEPS,
            4,
            cfg=CFG,
            sampler_name=SAMPLER,
            scheduler=SCHEDULER,
        )
    return act_map


@pytest.fixture(scope="module")
def folded(nodes, shipped, fitted):
    """(folded map, summary, progress bar updates, plain sample before the fold, the model's tensors before)."""
    import comfy.utils

    model, clip = shipped
    before = cs.sample_tiny(model, clip, "a red square", seed=5, **SAMPLE)
    tensors = {name: t for name, t in model.model.diffusion_model.state_dict(keep_vars=True).items()}
    bars = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            comfy.utils,
            "PROGRESS_BAR_HOOK",
            lambda value, total, preview, node_id=None: bars.append((value, total)),
        )
        with torch.inference_mode():
            out = nodes["ACTFoldMap"](model, clip, *fold_args(fitted))
    act_map, summary = out if isinstance(out, tuple) else out["result"]
    return act_map, summary, bars, before, tensors


def test_the_fold_gives_a_static_map_that_fitted(fitted, folded):
    from act_core.lora import check_foldable

    act_map, summary, bars, _, _ = folded
    assert fitted.buckets is not None and len(fitted.buckets) == STEPS
    assert act_map.buckets is None and act_map.metadata["cfg_rows"] == "all"
    assert sorted(act_map.modules) == sorted(fitted.modules)
    check_foldable(act_map)
    info = act_map.metadata["distilled"]
    assert info["host"] == "comfyui" and info["states"] == STEPS and info["steps"] == FOLD_STEPS
    assert info["sampling"] == {
        "width": PIXELS,
        "height": PIXELS,
        "steps": STEPS,
        "cfg": CFG,
        "sampler_name": SAMPLER,
        "scheduler": SCHEDULER,
        "negative_prompt": "",
    }
    assert info["loss_final"] < info["loss_initial"] and not info["kept_initial_map"]
    assert f"from {info['loss_initial']:.3f} at its start" in summary
    # one bar: the recording's sampling steps, then the Adam steps
    assert bars[:STEPS] == [(k, STEPS) for k in range(1, STEPS + 1)]
    assert bars[STEPS:] == [(k, FOLD_STEPS) for k in range(1, FOLD_STEPS + 1)]


def test_the_model_is_left_as_it_was(shipped, folded):
    """No hook left on the shared modules, ComfyUI's own weight tensors back in place."""
    model, clip = shipped
    _, _, _, before, tensors = folded
    after = model.model.diffusion_model.state_dict(keep_vars=True)
    assert all(after[name] is tensor for name, tensor in tensors.items())
    assert cs.sample_tiny(model, clip, "a red square", seed=5, **SAMPLE).equal(before)


@pytest.mark.filterwarnings("ignore:The fold ended with a higher loss")  # 2 steps may keep the start
def test_a_model_loaded_in_inference_mode_folds(pack, fitted):
    """ComfyUI's loader nodes run in inference mode, so the weights are inference tensors, which autograd
    cannot save for the backward pass: the fold works on copies and puts ComfyUI's own tensors back."""
    import comfy_shapes

    folding = importlib.import_module(f"{pack.__name__}.nodes.folding")
    with torch.inference_mode():
        model, clip = comfy_shapes.load_unet(SHIPPED), comfy_shapes.load_clip(SHIPPED)
        tensors = dict(model.model.diffusion_model.state_dict(keep_vars=True))
        assert all(t.is_inference() for t in tensors.values())
        names = ("seed", "width", "height", "steps", "cfg", "sampler_name", "scheduler", "negative_prompt")
        args = dict(zip(names, fold_args(fitted)[2:10], strict=True))
        act_map = folding.fold_node_map(model, clip, fitted, SOURCE_TEXT, fold_steps=2, lr=0.002, **args)
    assert act_map.metadata["distilled"]["steps"] == 2
    after = model.model.diffusion_model.state_dict(keep_vars=True)
    assert all(after[name] is tensor for name, tensor in tensors.items())


@pytest.fixture()
def loras(tmp_path, monkeypatch):
    import folder_paths

    folder = tmp_path / "loras"
    folder.mkdir()
    table = dict(folder_paths.folder_names_and_paths)
    table["loras"] = ([str(folder)], set(folder_paths.supported_pt_extensions))
    monkeypatch.setattr(folder_paths, "folder_names_and_paths", table)
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    return folder


def test_the_folded_map_exports_a_lora_that_samples_as_apply_act(
    nodes, shipped, fitted, folded, loras, caplog
):
    """Export node -> stock LoraLoader: every key loaded, and KSampler's sample is Apply ACT's with the folded
    map (hooks on every row) within float32 noise; the time-aware map itself is refused, naming the Fold
    node."""
    import comfy.lora
    import comfy.utils

    import nodes as comfy_nodes
    from act_core.errors import ACTInputError

    model, clip = shipped
    act_map = folded[0]
    with pytest.raises(ACTInputError, match="'Fold ACT map' node"):
        nodes["ACTExportLoRA"](model, clip, fitted, "timed", "fp32", False)
    out = nodes["ACTExportLoRA"](model, clip, act_map, "folded", "fp32", False)
    assert out["result"] == ("folded.safetensors",)
    lora = comfy.utils.load_torch_file(str(loras / "folded.safetensors"), safe_load=True)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    assert [key for key in lora if key.rsplit(".", 1)[0] not in key_map] == []
    lam = 1.0
    with caplog.at_level(logging.WARNING):
        lora_model, lora_clip = comfy_nodes.LoraLoader().load_lora(
            model, clip, "folded.safetensors", lam, lam
        )
    assert not [r for r in caplog.records if "not loaded" in r.getMessage().lower()]
    assert len(lora_model.patches) == len(lora) == 2 * len(act_map)
    act_model, act_clip = nodes["ACTApply"](model, clip, act_map, lam)
    via_lora = cs.sample_tiny(lora_model, lora_clip, "a red square", seed=4, **SAMPLE)
    via_act = cs.sample_tiny(act_model, act_clip, "a red square", seed=4, **SAMPLE)
    base = cs.sample_tiny(model, clip, "a red square", seed=4, **SAMPLE)
    scale = float((via_act - base).abs().max())
    assert scale > 1e-2
    torch.testing.assert_close(via_lora, via_act, rtol=1e-4, atol=1e-4 * scale)


def test_both_hosts_fold_the_same_map_alike(pack, shipped):
    """The diffusers map pinned for the shipped model (``tests/pinned_maps.py``), folded by each host with the
    same prompts, seed, sampler and settings.

    The hosts' samplers are not bit-identical, so neither are the states: ComfyUI starts from noise x sqrt(1
    + sigma^2) (its EPS ``max_denoise`` scaling), diffusers' Euler "trailing" from noise x sigma (inputs 0.2 %
    apart at the first step), and diffusers' SDXL pipeline feeds zeros for an empty negative prompt, which
    ComfyUI encodes as text, so both fold with a negative prompt. With that, what each host records of the
    teacher (its guided prediction along its own generation) agrees within 5 % of the teacher's move at every
    step (measured: 1.6 % at the first, under 1 % after), and the two folded maps steer alike: on the
    diffusers host's states their guided predictions are apart by under 1 % of what either misses the teacher
    by (measured: 1.9e-6 of the teacher's squared move, against 0.056 missed by each, with the pinned map of
    the norm calibration; 5.4e-6 against 0.067 with the earlier one). 20 steps at lr 0.01, one call per step: with
    this negative prompt lr 0.02 overshoots on this model within 20 steps."""
    import pinned_maps

    from act_core.diffusers import act_pipeline
    from act_core.diffusers.folding import DiffusersFoldHost
    from act_core.distill import _plain_outputs, _StaticHooks, fold_map, relative_error
    from act_core.maps import ACTMap
    from act_core.sampling import SamplingSettings
    from demo.paths import load_demo_pipeline

    folding = importlib.import_module(f"{pack.__name__}.nodes.folding")
    model, clip = shipped
    teacher = ACTMap.load(pinned_maps.pinned_path("sdxl_default"))
    assert teacher.metadata["sampling"]["num_inference_steps"] == STEPS
    negative = "a circle"
    pipe = act_pipeline(load_demo_pipeline())
    diffusers_host = DiffusersFoldHost(pipe, teacher, negative_prompt=negative)
    comfy_host = folding.ComfyFoldHost(
        model,
        clip,
        teacher,
        SamplingSettings(STEPS, CFG, PIXELS, PIXELS, negative),
        sampler_name=SAMPLER,
        scheduler=SCHEDULER,
    )
    with comfy_host.fitting():
        comfy_calls = comfy_host.record(teacher, 1.0, SOURCE, 0)
    diffusers_calls = diffusers_host.record(teacher, 1.0, SOURCE, 0)
    _plain_outputs(diffusers_host, diffusers_calls)
    assert [c.level for c in comfy_calls] == [d.level for d in diffusers_calls]
    for ours, theirs in zip(comfy_calls, diffusers_calls, strict=True):
        move = float((theirs.teacher - theirs.plain).abs().max())
        assert float((ours.teacher - theirs.teacher).abs().max()) < 0.05 * move

    maps = {}
    for name, host in (("comfyui", comfy_host), ("diffusers", diffusers_host)):
        maps[name] = fold_map(host, teacher, SOURCE, steps=FOLD_STEPS, lr=0.01, calls_per_step=1)
        assert (
            maps[name].metadata["distilled"]["loss_final"] < maps[name].metadata["distilled"]["loss_initial"]
        )
    modules = diffusers_host.modules()
    hooks = {name: _StaticHooks(modules, m, torch.device("cpu")) for name, m in maps.items()}
    misses = {name: relative_error(diffusers_host, h, diffusers_calls)["pooled"] for name, h in hooks.items()}
    apart = move_total = 0.0
    with torch.no_grad():
        for call in diffusers_calls:
            with hooks["comfyui"].active():
                ours = call.guided(diffusers_host.run(call, None))
            with hooks["diffusers"].active():
                theirs = call.guided(diffusers_host.run(call, None))
            apart += float((ours - theirs).pow(2).sum())
            move_total += float((call.plain - call.teacher).pow(2).sum())
    print(f"pooled relative errors {misses}; the two folds apart: {apart / move_total:.3g}")
    assert apart / move_total < 0.01 * min(misses.values())


def test_an_empty_prompt_box_folds_along_the_prompts_the_map_was_fitted_on(nodes, shipped, fitted, folded):
    """The Fit node's map records its source prompts, so the Fold node needs none: its fold with the box empty
    is the fold with the Fit node's prompts typed in (same states, same seed, same map)."""
    model, clip = shipped
    assert fitted.metadata["source_prompts"] == list(SOURCE)
    with torch.inference_mode():
        by_default, _ = nodes["ACTFoldMap"](model, clip, *fold_args(fitted, source=""))
    for name, module_map in folded[0].modules.items():
        torch.testing.assert_close(by_default.modules[name].omega, module_map.omega)
        torch.testing.assert_close(by_default.modules[name].beta, module_map.beta)


def test_bad_inputs_are_refused_naming_the_fix(nodes, shipped, fitted, folded):
    from act_core.errors import ACTInputError, ACTModelMismatchError
    from act_core.maps import ACTMap

    model, clip = shipped
    node = nodes["ACTFoldMap"]
    two_sided = ACTMap(fitted.modules, {**fitted.metadata, "two_sided": True}, fitted.buckets, fitted)
    with pytest.raises(ACTInputError, match="two-sided.*fit a one-sided map"):
        node(model, clip, *fold_args(two_sided))
    flux = fitted.with_metadata({**fitted.metadata, "family": "flux"})
    with pytest.raises(
        ACTModelMismatchError, match="fitted on a FLUX.* this MODEL is SDXL.*use a map fitted"
    ):
        node(model, clip, *fold_args(flux))
    with pytest.raises(ACTInputError, match="already static.*nothing to fold"):
        node(model, clip, *fold_args(folded[0]))
    # empty prompts: the ones the map was fitted on, which it records; a map that does not is refused
    anonymous = ACTMap(
        fitted.modules, {k: v for k, v in fitted.metadata.items() if k != "source_prompts"}, fitted.buckets
    )
    for blank in ("", "\n \n"):
        with pytest.raises(ACTInputError, match="does not record the prompts it was fitted on.*pass them"):
            node(model, clip, *fold_args(anonymous, source=blank))
    with pytest.raises(ACTInputError, match="must be an ACT map"):
        node(model, clip, *fold_args("not a map"))


def test_a_fold_that_comfyui_splits_into_cond_and_uncond_calls_is_refused(
    nodes, shipped, fitted, monkeypatch
):
    """Without memory for both halves in one call ComfyUI runs the prompts' and the negative prompt's rows
    apart: the fold stops, saying why and what to do, and leaves the model as it was."""
    import comfy.model_management as mm

    from act_core.errors import ACTInputError

    model, clip = shipped
    before = cs.sample_tiny(model, clip, "a red square", seed=5, **SAMPLE)
    monkeypatch.setattr(mm, "get_free_memory", lambda *args, **kwargs: 1)
    with (
        pytest.raises(ACTInputError, match="separate calls.*smaller width and height"),
        torch.inference_mode(),
    ):
        nodes["ACTFoldMap"](model, clip, *fold_args(fitted, fold_steps=1))
    monkeypatch.undo()
    assert cs.sample_tiny(model, clip, "a red square", seed=5, **SAMPLE).equal(before)


def test_cancelling_a_fold_leaves_the_model_as_it_was(nodes, shipped, fitted, monkeypatch):
    """Cancel (ComfyUI's interrupt) during the Adam steps: the node raises ComfyUI's interruption, no hook
    stays on the shared modules and ComfyUI's own weight tensors are back."""
    import comfy.model_management as mm

    model, clip = shipped
    before = cs.sample_tiny(model, clip, "a red square", seed=5, **SAMPLE)
    tensors = dict(model.model.diffusion_model.state_dict(keep_vars=True))
    checks = []

    def interrupt_later():
        checks.append(1)
        if len(checks) == 12:  # the prompts' encoding and the 4 recorded calls come first
            raise mm.InterruptProcessingException()

    monkeypatch.setattr(mm, "throw_exception_if_processing_interrupted", interrupt_later)
    with pytest.raises(mm.InterruptProcessingException), torch.inference_mode():
        nodes["ACTFoldMap"](model, clip, *fold_args(fitted))
    monkeypatch.undo()
    assert len(checks) == 12
    after = model.model.diffusion_model.state_dict(keep_vars=True)
    assert all(after[name] is tensor for name, tensor in tensors.items())
    assert cs.sample_tiny(model, clip, "a red square", seed=5, **SAMPLE).equal(before)

"""Checks every family's ComfyUI tests run on its tiny model in both hosts, written once.

Each family's ComfyUI test module (``tests/comfyui/test_comfy_<family>.py``) keeps its own tests, fixtures and
its model's call conventions (the diffusers and ComfyUI velocity of one denoiser call) and calls these for the
procedure they share: the two hosts' models are the same model, a diffusers-fitted map steers ComfyUI as it
steers diffusers and leaves the input MODEL untouched, the Fit node's map steers KSampler (strength 0 exact)
and the diffusers pipeline. What differs between families comes in as parameters or callables.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from family_checks import check_same_maps  # noqa: F401 - the ComfyUI tests compare maps with it too

SIGMA = 0.55  # between two of a 3-step map's noise levels: both hosts interpolate the same way
SAME_MODEL_SIGMAS = (1.0, SIGMA)


def act_pipe_and_comfy_model(
    base: Any, load: Callable[[torch.nn.Module], Any], denoiser: str = "transformer"
) -> tuple[Any, Any]:
    """(the ACT pipeline of ``base`` without progress bars, ``load(its denoiser)``: ComfyUI's MODEL with the
    same weights)."""
    from act_core.diffusers import act_pipeline

    pipe = act_pipeline(base)
    pipe.set_progress_bar_config(disable=True)
    return pipe, load(getattr(pipe, denoiser))


def fit_quietly(
    pipe: Any, source: list[str], target: list[str], presets: Iterable[str] | Mapping, **sampling
):
    """{preset: the diffusers map fitted on ``pipe`` with it} (``presets``: names, or names -> extra fit
    options), the tests' tokenizer's unknown-word warnings silenced."""
    options = presets if isinstance(presets, Mapping) else dict.fromkeys(presets, {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tests' tokenizer does not know these words
        return {
            preset: pipe.fit_act(source, target, preset=preset, progress=False, **sampling, **extra)
            for preset, extra in options.items()
        }


def comfy_velocity(patcher: Any, x: torch.Tensor, sigma: float, **conds: Any) -> torch.Tensor:
    """ComfyUI's model output for latents ``x`` at ``sigma`` (``conds``: the model's ``apply_model`` inputs),
    called as its samplers call it (the patcher loaded with its ACT hooks or weight patches, its wrappers,
    the sigmas, cond rows only), as ``(x - denoised) / sigma``: a flow model's velocity, an EPS model's eps."""
    import comfy.model_management as mm
    import comfy.patcher_extension

    mm.load_models_gpu([patcher])  # patches this clone in (its ACT hooks are injected on load)
    options = {
        "wrappers": comfy.patcher_extension.copy_nested_dicts(patcher.wrappers),
        "sigmas": torch.tensor([sigma]),
        "cond_or_uncond": [0],
    }
    with torch.no_grad():
        denoised = patcher.model.apply_model(x, torch.tensor([sigma]), transformer_options=options, **conds)
    return (x - denoised) / sigma  # ComfyUI's flow models return x - sigma * velocity


def flux_layout_velocity(pipe: Any, x: torch.Tensor, sigma: float, **conds: Any) -> torch.Tensor:
    """A diffusers FLUX-layout transformer's output (FLUX.1's, Chroma's) for ComfyUI's latents ``x`` at
    ``sigma``: ``x`` packed into 2x2-patch tokens with their image ids, ``conds`` the transformer's text
    inputs, the output unpacked back to ComfyUI's latent layout."""
    batch, channels, height, width = x.shape
    with torch.no_grad():
        packed = pipe._pack_latents(x, batch, channels, height, width)
        ids = pipe._prepare_latent_image_ids(batch, height // 2, width // 2, "cpu", torch.float32)
        out = pipe.transformer(
            hidden_states=packed, timestep=torch.tensor([sigma]), img_ids=ids, return_dict=False, **conds
        )[0]
    scale = pipe.vae_scale_factor
    return pipe._unpack_latents(out, height * scale, width * scale, scale)


def hooked_modules(patcher: Any) -> set[str]:
    """The paths of the ComfyUI diffusion model's modules that carry ACT hooks."""
    return {n for n, m in patcher.model.diffusion_model.named_modules() if hasattr(m, "_act_handle")}


def with_map(pipe: Any, act_map: Any, compute: Callable[[], Any], prompt_rows: bool = False) -> Any:
    """``compute()`` with ``act_map`` enabled on the diffusers pipeline at strength 1, disabled again after.
    ``prompt_rows``: inside ``active_pipeline(pipe, cfg_batch=False)``: outside a generation the gate is told
    the pipeline does not guide, so every row is the prompt's (as ComfyUI's cond rows)."""
    from act_core.diffusers import active_pipeline

    pipe.enable_act(act_map, strength=1.0)
    try:
        if not prompt_rows:
            return compute()
        with active_pipeline(pipe, cfg_batch=False):
            return compute()
    finally:
        pipe.disable_act()


def check_same_model(
    pipe: Any,
    model: Any,
    inputs: dict,
    comfy_velocity: Callable[[Any, dict, float], torch.Tensor],
    diffusers_velocity: Callable[[Any, dict, float], torch.Tensor],
    sigmas: Iterable[float] = SAME_MODEL_SIGMAS,
) -> None:
    """ComfyUI's MODEL and the diffusers transformer with its weights give the same output for the same
    ``inputs`` (each host's call: ``comfy_velocity(model, inputs, sigma)``, ``diffusers_velocity(pipe,
    inputs, sigma)``) at pure noise and mid-trajectory."""
    for sigma in sigmas:
        torch.testing.assert_close(
            comfy_velocity(model, inputs, sigma),
            diffusers_velocity(pipe, inputs, sigma),
            rtol=1e-4,
            atol=1e-4,
        )


def check_a_diffusers_map_steers_comfyui_as_diffusers(
    apply: Callable,
    pipe: Any,
    model: Any,
    act_map: Any,
    inputs: dict,
    comfy_velocity: Callable[[Any, dict, float], torch.Tensor],
    diffusers_velocity: Callable[[Any, dict, float], torch.Tensor],
    *,
    prompt_rows: bool = False,
    hooked: Callable[[Any], set[str]] = hooked_modules,
    must_hook: Iterable[str] = (),
    sigma: float = SIGMA,
) -> None:
    """Apply ACT with a diffusers-fitted map at strength 1: ComfyUI's output changes and equals the diffusers
    transformer's with the map (``with_map``'s ``prompt_rows``); while the steered clone is loaded
    ``hooked(model)`` holds ``must_hook``; the input MODEL is untouched: loading it again gives the plain
    output, with no ACT hooks left."""
    plain = comfy_velocity(model, inputs, sigma)
    steered_model, _ = apply(model, None, act_map, 1.0)
    steered = comfy_velocity(steered_model, inputs, sigma)
    assert hooked(model) >= set(must_hook)
    expected = with_map(pipe, act_map, lambda: diffusers_velocity(pipe, inputs, sigma), prompt_rows)
    assert (steered - plain).abs().max() > 1e-3
    torch.testing.assert_close(steered, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(comfy_velocity(model, inputs, sigma), plain, rtol=0, atol=0)
    assert hooked(model) == set()


def fit_node(nodes: Mapping, model: Any, clip: Any, source: list[str], target: list[str], **options: Any):
    """The Fit ACT map node's output (its result tuple, or a dict with the UI's text) on ``model`` / ``clip``
    for ``source`` -> ``target`` with its default preset, linear method, auto support, preset mode, seed 0,
    64 px, 3 steps and batch 4; ``options`` (``cfg`` at least) set or override the node's other inputs."""
    args = {
        "source_prompts": "\n".join(source),
        "target_prompts": "\n".join(target),
        "preset": "default",
        "parts": "",
        "method": "linear",
        "support": "auto",
        "mode": "preset",
        "fit_seed": 0,
        "width": 64,
        "height": 64,
        "steps": 3,
        "batch_size": 4,
        **options,
    }
    return nodes["ACTFitMap"].fit(model, clip, **args)


def check_the_map_steers_ksampler(
    apply: Callable,
    model: Any,
    clip: Any,
    act_map: Any,
    sample: Callable[[Any, Any], torch.Tensor],
    caplog=None,
) -> Any:
    """Apply ACT's MODEL at strength 0 samples exactly the plain output, at strength 1 another one, and the
    input MODEL still samples the plain one (``sample(model, clip)``: KSampler with the CLIP Apply ACT
    returned alongside, or the input one); with ``caplog``, strength 1 logs that it applied the map with no
    module left out (strength 0 logs that it leaves the transformer out). Returns the steered MODEL."""
    if caplog is not None:
        caplog.set_level("INFO", logger="ComfyUI-ACT")
    plain = sample(model, clip)
    at_zero, clip_at_zero = apply(model, clip, act_map, 0.0)
    if caplog is not None:
        caplog.clear()
    steered, steered_clip = apply(model, clip, act_map, 1.0)
    assert torch.equal(sample(at_zero, clip_at_zero), plain)
    assert (sample(steered, steered_clip) - plain).abs().max() > 1e-3
    torch.testing.assert_close(sample(model, clip), plain, rtol=0, atol=0)  # the input MODEL is untouched
    if caplog is not None:
        assert "ACT applied" in caplog.text and "left out" not in caplog.text  # every map module hooked
    return steered


def check_a_comfyui_map_steers_diffusers(
    pipe: Any,
    act_map: Any,
    inputs: dict,
    diffusers_velocity: Callable[[Any, dict, float], torch.Tensor],
    prompt_rows: bool = False,
    sigma: float = SIGMA,
) -> torch.Tensor:
    """Portable: a ComfyUI-fitted map applies to the diffusers pipeline (every module matched) and changes
    its transformer's output. Returns that steered output (``with_map``'s ``prompt_rows``)."""
    moved = with_map(pipe, act_map, lambda: diffusers_velocity(pipe, inputs, sigma), prompt_rows)
    assert (moved - diffusers_velocity(pipe, inputs, sigma)).abs().max() > 1e-3
    return moved


def check_refused_on_sdxl(apply: Callable, act_map: Any, match: str) -> None:
    """Apply ACT refuses the map on a tiny SDXL MODEL (another family's), saying ``match``."""
    import pytest
    from comfy_support import build_tiny_sdxl

    from act_core.errors import ACTModelMismatchError

    tiny_sdxl, tiny_clip = build_tiny_sdxl(seed=0)
    with pytest.raises(ACTModelMismatchError, match=match):
        apply(tiny_sdxl, tiny_clip, act_map, 1.0)


def check_no_lora_export(export: Callable, model: Any, act_map: Any, name: str) -> None:
    """The Export node refuses to write the (time-aware, unfoldable) map as a LoRA, saying so."""
    import pytest

    from act_core.errors import ACTInputError

    with pytest.raises(ACTInputError, match="LoRA"):
        export(model, None, act_map, name, "fp32", False)

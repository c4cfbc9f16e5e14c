"""Apply an ACT map to ComfyUI's MODEL / CLIP clones: weight "diff" patches or removable hooks.

* A part whose maps are affine on every element (unbounded support, per-element; e.g. the
  ``unet_norms_foldable`` preset) becomes ``add_patches`` diffs on the norm weights and biases, linear in
  lambda: zero cost per step, restored by ComfyUI on unpatch, and stackable with LoRAs.
* Other maps (the paper's bounded support, spatial-mean feature maps) are forward hooks installed by a
  ``PatcherInjection`` (added in ``patch_model``, removed in ``unpatch_model``), so they exist only while
  this clone is the loaded one. On the denoiser an ``APPLY_MODEL`` wrapper restricts them to the cond rows
  of a CFG batch (``transformer_options["cond_or_uncond"]``) and to the start/end window (sigmas).

The input MODEL and CLIP are never modified: everything goes onto clones. Strength 0 adds nothing at all.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from act_core.applying import ACTHandle, check_strength, folded_diffs
from act_core.errors import ACTInputError, ACTModelMismatchError
from act_core.families import ModelFamily, check_comfy_map, family_of_map
from act_core.lora import as_foldable
from act_core.maps import ACTMap
from act_core.validation import check_window

from .comfy_models import (
    check_fits,
    checkpoint_shells,
    clip_modules,
    denoiser_modules,
    key_table,
    state_keys,
    timestep_scale,
)
from .common import transformer_options_of

log = logging.getLogger("ComfyUI-ACT")
PATCHES, HOOKS = "weight patches", "hooks"


def fold_patches(
    patcher: Any,
    part_map: ACTMap,
    modules: Mapping[str, nn.Module],
    key_of: Callable[[str], str],
    with_patches: bool = True,
) -> dict[str, torch.Tensor] | None:
    """``{state-dict key: diff at lambda 1}`` for a foldable map, or None when it cannot be folded.

    The diffs are taken against the weights this patcher would load (the checkpoint's, plus its own
    patches on the same keys when ``with_patches``), never against whatever another clone patched in.
    """
    try:
        foldable = as_foldable(part_map, modules)
    except ACTInputError:
        return None
    keys = {name: key_of(name) for name in foldable.modules}
    shells = checkpoint_shells(patcher, foldable.modules, modules, keys, with_patches)
    try:
        diffs = folded_diffs(shells, foldable, 1.0)
    except ACTInputError:
        return None
    out = {}
    for key, diff in diffs.items():
        name, param = key.rsplit(".", 1)
        out[f"{keys[name]}.{param}"] = diff
    return out


def _add_diff_patches(patcher: Any, patches: Mapping[str, torch.Tensor], strength: float, what: str) -> None:
    added = set(patcher.add_patches({key: (diff,) for key, diff in patches.items()}, strength))
    missing = sorted(set(patches) - added)
    if missing:
        raise ACTModelMismatchError(
            f"{len(missing)} of {len(patches)} ACT weight patches did not match {what} (first: {missing[0]!r}); "
            "the map was fitted on another model architecture."
        )


class _Hooks:
    """Inject/eject state of one map on one patcher: the ACT hooks exist only while the clone is patched in."""

    def __init__(self, act_map: ACTMap, strength: float, resolve: Callable[[Any], Mapping[str, nn.Module]]):
        self.act_map = act_map
        self.strength = strength
        self.resolve = resolve
        self.handle: ACTHandle | None = None

    def inject(self, patcher: Any) -> None:
        self.eject(patcher)
        modules = self.resolve(patcher)
        self.handle = ACTHandle(
            self.act_map, {name: modules[name] for name in self.act_map.modules}, self.strength
        )

    def eject(self, patcher: Any) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def injection(self) -> Any:
        from comfy.patcher_extension import PatcherInjection

        return PatcherInjection(inject=self.inject, eject=self.eject)


def cond_rows(cond_or_uncond: Any, batch: int) -> tuple[bool, slice | torch.Tensor | None]:
    """(any cond rows?, the rows of the cond chunks) of a batch ComfyUI split into equal chunks."""
    if not cond_or_uncond or all(c == 0 for c in cond_or_uncond):
        return True, None
    chunks = len(cond_or_uncond)
    if batch % chunks:
        return True, None
    size = batch // chunks
    index = [k for k, c in enumerate(cond_or_uncond) if c == 0]
    if not index:
        return False, None
    if index == list(range(index[0], index[-1] + 1)):
        return True, slice(index[0] * size, (index[-1] + 1) * size)
    return True, torch.cat([torch.arange(k * size, (k + 1) * size) for k in index])


def noise_level(model_sampling: Any, sigma: float, scale: float) -> float:
    """The noise level u of a model call at ``sigma`` (a time-aware map's key): the model's timestep over
    ``scale`` (``comfy_models.timestep_scale``)."""
    return float(model_sampling.timestep(torch.tensor(sigma))) / scale


def denoiser_wrapper(
    hooks: _Hooks,
    sigma_start: float | None,
    sigma_end: float | None,
    model_sampling: Any,
    cfg_rows: str,
    family: ModelFamily,
) -> Callable:
    """APPLY_MODEL wrapper (every ComfyUI model runs it; not every one a DIFFUSION_MODEL wrapper): per call,
    the rows to steer (the cond chunks, unless the map steers all rows), the noise level (time-aware maps)
    and whether the call is inside [sigma_end, sigma_start]."""
    scale = timestep_scale(family, model_sampling)

    def wrapper(executor, *args, **kwargs):
        handle = hooks.handle
        if handle is not None and args:
            options = transformer_options_of(args, kwargs)
            enabled, rows = True, None
            if cfg_rows == "cond":
                enabled, rows = cond_rows(options.get("cond_or_uncond"), args[0].shape[0])
            sigmas = options.get("sigmas")
            level = None
            if sigmas is not None:
                sigma = float(torch.as_tensor(sigmas).max())
                if sigma_start is not None:
                    enabled = enabled and sigma_end <= sigma <= sigma_start
                level = noise_level(model_sampling, sigma, scale)
            handle.set_call([family.denoiser], rows=rows, noise_level=level, in_window=enabled)
        return executor(*args, **kwargs)

    return wrapper


def map_family(act_map: ACTMap) -> ModelFamily:
    """The model family a map was fitted on (its metadata; ``act_core.families`` decides)."""
    return family_of_map(act_map.metadata)


def apply_map(
    model: Any,
    clip: Any,
    act_map: ACTMap,
    strength: float,
    text_encoder_strength: float | None = None,
    start_percent: float = 0.0,
    end_percent: float = 1.0,
    force_hooks: bool = False,
) -> tuple[Any, Any, dict[str, str]]:
    """Patched clones (MODEL, CLIP) and how each part was applied ({"unet": "weight patches", ...})."""
    if not isinstance(act_map, ACTMap):
        raise ACTInputError("act_map must be an ACT map (from 'Fit ACT map' or 'Load ACT map').")
    strength = check_strength(strength)
    te_strength = (
        strength
        if text_encoder_strength is None
        else check_strength(text_encoder_strength, "text encoder strength")
    )
    start, end = check_window(start_percent, end_percent)
    model_out = model.clone() if model is not None else None
    clip_out = clip.clone() if clip is not None else None
    how: dict[str, str] = {}
    parts = act_map.parts()
    tag = f"comfyui_act_{uuid.uuid4().hex[:12]}"

    family = map_family(act_map)
    denoiser = family.denoiser
    if denoiser in parts and strength != 0.0:
        if model is None:
            raise ACTInputError(f"This ACT map steers the {denoiser}: connect a MODEL.")
        check_comfy_map(act_map.metadata, model.model.diffusion_model)
        modules = denoiser_modules(model, family)
        part_map = act_map.restrict(parts=[denoiser])
        check_fits(part_map, modules, f"this MODEL's {denoiser}")
        window = start > 0.0 or end < 1.0
        patches = (
            None
            if (window or force_hooks or not family.folds)
            else fold_patches(
                model, part_map, modules, state_keys(part_map.modules, family, model).__getitem__
            )
        )
        if patches is not None:
            _add_diff_patches(model_out, patches, strength, "this MODEL")
            how[denoiser] = PATCHES
        else:
            from comfy.patcher_extension import WrappersMP

            table = key_table(model)

            def resolve(patcher: Any) -> Mapping[str, nn.Module]:
                return family.comfy_denoiser_modules(patcher.model.diffusion_model, table)

            hooks = _Hooks(part_map, strength, resolve)
            sigma_start = sigma_end = None
            sampling = model.get_model_object("model_sampling")
            if window:
                sigma_start, sigma_end = (
                    float(sampling.percent_to_sigma(start)),
                    float(sampling.percent_to_sigma(end)),
                )
            cfg_rows = act_map.metadata.get("cfg_rows", "cond")
            model_out.set_injections(tag, [hooks.injection()])
            model_out.add_wrapper_with_key(
                WrappersMP.APPLY_MODEL,
                tag,
                denoiser_wrapper(hooks, sigma_start, sigma_end, sampling, cfg_rows, family),
            )
            how[denoiser] = HOOKS

    te_parts = [part for part in parts if part != denoiser]
    if te_parts and te_strength != 0.0:
        if clip is None:
            raise ACTInputError("This ACT map steers the text encoders: connect a CLIP.")
        modules = clip_modules(clip, family)
        part_map = act_map.restrict(parts=te_parts)
        check_fits(part_map, modules, "this CLIP")
        patches = (
            None
            if force_hooks or not family.folds
            else fold_patches(
                clip.patcher, part_map, modules, state_keys(part_map.modules, family, None).__getitem__
            )
        )
        if patches is not None:
            _add_diff_patches(clip_out.patcher, patches, te_strength, "this CLIP")
            label = PATCHES
        else:

            def resolve_clip(patcher: Any) -> Mapping[str, nn.Module]:
                return family.comfy_clip_modules(patcher.model)

            hooks = _Hooks(part_map, te_strength, resolve_clip)
            clip_out.patcher.set_injections(tag, [hooks.injection()])
            label = HOOKS
        how.update({part: label for part in te_parts})
    skipped = [part for part in parts if part not in how]
    if skipped:
        log.info(
            "ACT: the map's %s part(s) left out: strength 0 (denoiser %g, text encoders %g).",
            ", ".join(skipped),
            strength,
            te_strength,
        )
    if how:
        log.info("ACT applied (strength %g, text encoders %g): %s", strength, te_strength, how)
    return model_out, clip_out, how

"""Apply an ACT map to a model: forward hooks with a live strength, or maps folded into weights.

This is the one place where lambda meets activations (a two-sided map's negative lambda takes its less side
with |lambda|: ``TransportHook``). With ``scale = 1 + lam * (omega - 1)`` and
``shift = lam * beta`` the transported output is ``x * scale + shift`` where the support mask is on and
``x`` elsewhere, i.e. ``x + lam * m(x) * ((omega - 1) * x + beta)``; it is computed in float32 and cast
back to the activation's dtype. Folding writes the same affine map into the producing layer as weight
and bias diffs that are linear in lam, which is exactly a LoRA-style "diff" patch.

Time-aware maps (``ACTMap.buckets``) hold one (omega, beta, support) per noise level; the host tells the
handle the noise level of each model call (``ACTHandle.set_call``) and the hooks interpolate
omega and beta linearly between the two buckets around it (the support of the nearer one is used).
Outside the fitted range the nearest bucket applies.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import ACTInputError, ACTModelMismatchError
from .maps import APPLY_SPATIAL_MEAN, ACTMap, ModuleMap, part_of
from .recording import OutputOf, channel_axis, hook_module, read_output, widths_of, write_output
from .validation import check_strength

FOLDABLE_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
)
_HANDLE_ATTR = "_act_handle"
_FOLD_ATTR = "_act_fold"

Strength = float | Mapping[str, float]
# (lower bucket, upper bucket, weight of the upper one): where a noise level falls between buckets.
BucketPosition = tuple[int, int, float]


def bucket_position(buckets: tuple[float, ...], level: float) -> BucketPosition:
    """Where noise level ``level`` falls among ``buckets``: interpolation indices and weight."""
    order = sorted(range(len(buckets)), key=lambda k: buckets[k])
    levels = [buckets[k] for k in order]
    if level <= levels[0]:
        return order[0], order[0], 0.0
    if level >= levels[-1]:
        return order[-1], order[-1], 0.0
    upper = next(k for k, value in enumerate(levels) if value >= level)
    lower = upper - 1
    weight = (level - levels[lower]) / (levels[upper] - levels[lower])
    return order[lower], order[upper], float(weight)


@dataclass
class PartControl:
    """Live settings shared by all hooks of one model part; hosts change them between forwards.

    ``strength`` and ``enabled`` are shared by every thread. What a host sets per model call (the
    rows to steer, e.g. the cond half of a CFG batch; the noise-level bucket; whether the call is
    inside the map's start/end window) is kept per thread (``CallState``), so two generations that
    share the modules in two threads cannot mix each other's batch layout.
    """

    strength: float = 1.0
    enabled: bool = True
    call: threading.local = field(default_factory=threading.local, repr=False)

    def call_state(self) -> CallState:
        state = getattr(self.call, "state", None)
        if state is None:
            state = self.call.state = CallState()
        return state


@dataclass
class CallState:
    """Per-thread, per-call settings of one part (see ``PartControl``)."""

    rows: slice | torch.Tensor | None = None
    position: BucketPosition = (0, 0, 0.0)
    in_window: bool = True


class _DeviceParams:
    """scale/shift/low/high as float32 tensors on the activation's device, rebuilt only on change."""

    def __init__(self, module_map: ModuleMap):
        self.module_map = module_map
        self._key: tuple | None = None
        self._tensors: tuple[torch.Tensor, ...] = ()
        self._device_map: tuple[torch.device, tuple[torch.Tensor, ...]] | None = None

    def _on(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        if self._device_map is None or self._device_map[0] != device:
            m = self.module_map
            self._device_map = (device, tuple(t.to(device) for t in (m.omega, m.beta, m.low, m.high)))
        return self._device_map[1]

    def get(
        self, strength: float, device: torch.device, position: BucketPosition = (0, 0, 0.0)
    ) -> tuple[torch.Tensor, ...]:
        bucketed = self.module_map.bucketed
        key = (strength, device, position if bucketed else None)
        if key != self._key:
            omega, beta, low, high = self._on(device)
            if bucketed:
                lower, upper, weight = position
                omega = torch.lerp(omega[lower], omega[upper], weight)
                beta = torch.lerp(beta[lower], beta[upper], weight)
                nearer = upper if weight >= 0.5 else lower
                low, high = low[nearer], high[nearer]
            self._tensors = (1.0 + strength * (omega - 1.0), strength * beta, low, high)
            self._key = key
        return self._tensors


def transport(
    x: torch.Tensor,
    module_map: ModuleMap,
    strength: float,
    params: _DeviceParams | None = None,
    position: BucketPosition = (0, 0, 0.0),
    inplace: bool = False,
) -> torch.Tensor:
    """Transport one activation tensor with strength ``strength`` (see the module docstring).

    ``position`` picks the noise-level bucket(s) of a time-aware map (ignored by one-bucket maps).
    ``inplace`` lets a float32 ``x`` be overwritten (no copy of a large feature map); the caller
    guarantees nothing else holds it.
    """
    axis = channel_axis(x.ndim)
    if x.shape[axis] != module_map.width:
        raise ACTModelMismatchError(
            f"Activation has {x.shape[axis]} units on axis {axis} but the ACT map has {module_map.width}: "
            "the map was fitted on another model."
        )
    scale, shift, low, high = (params or _DeviceParams(module_map)).get(strength, x.device, position)
    view = [1] * x.ndim
    view[axis] = -1
    scale, shift, low, high = (t.view(view) for t in (scale, shift, low, high))
    bounded = not module_map.unbounded
    inplace = inplace and x.dtype == torch.float32
    xf = x.float()
    if module_map.apply_mode == APPLY_SPATIAL_MEAN and x.ndim >= 4:
        mean = xf.mean(dim=tuple(range(2, x.ndim)), keepdim=True)
        delta = mean * (scale - 1.0) + shift
        if bounded:
            delta = delta * ((low < mean) & (mean < high))
        return x.add_(delta) if inplace else (xf + delta).to(x.dtype)
    if inplace and not bounded:
        return x.mul_(scale).add_(shift)
    else:
        out = torch.addcmul(shift, xf, scale)
        if bounded:
            out = torch.where((low < xf) & (xf < high), out, xf)
    return out.to(x.dtype)


def _aliases_input(x: torch.Tensor, args: Any) -> bool:
    """True when ``x`` shares memory with a tensor argument (e.g. an identity-like module's output)."""
    storage = x.untyped_storage().data_ptr()
    return any(
        isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() == storage
        for a in args
        if a is not None
    )


class TransportHook:
    """A forward hook that transports one module's output; reads strength from its part's control.

    With a two-sided map's ``less_map``, a negative strength applies ``less_map`` with ``|strength|``.
    """

    def __init__(
        self,
        name: str,
        module_map: ModuleMap,
        control: PartControl,
        entry: Any = None,
        less_map: ModuleMap | None = None,
    ):
        self.name = name
        self.control = control
        self.entry = entry  # a module, or an OutputOf (one stream of a tuple output)
        self._sides = {1: (module_map, _DeviceParams(module_map))}
        if less_map is not None:
            self._sides[-1] = (less_map, _DeviceParams(less_map))

    @property
    def module_map(self) -> ModuleMap:
        return self._sides[1][0]

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        control = self.control
        strength = control.strength
        if not control.enabled or strength == 0.0:
            return None  # exactly the model's own output
        module_map, params = self._sides[1]
        if strength < 0 and -1 in self._sides:
            (module_map, params), strength = self._sides[-1], -strength
        call = control.call_state()
        if not call.in_window:
            return None
        x = read_output(self.entry, output)
        if x is None:
            return None
        # Overwrite the output in place when nothing else can see it (inference, not an input's alias): a
        # feature map is not copied on every call. Otherwise transport a copy.
        inplace = not x.requires_grad and not isinstance(self.entry, OutputOf) and not _aliases_input(x, args)
        if call.rows is None:
            y = transport(x, module_map, strength, params, call.position, inplace)
        elif inplace and isinstance(call.rows, slice):
            transport(x[call.rows], module_map, strength, params, call.position, True)
            y = x
        else:
            y = x.clone()
            y[call.rows] = transport(x[call.rows], module_map, strength, params, call.position)
        return write_output(self.entry, output, y)


class ACTHandle:
    """Hooks that apply one map to a model. Change strength live; ``remove()`` restores the model."""

    def __init__(self, act_map: ACTMap, modules: Mapping[str, nn.Module], strength: Strength = 1.0):
        self.act_map = act_map
        self.controls = {part: PartControl() for part in act_map.parts()}
        self.set_strength(strength)
        self._modules = {name: modules[name] for name in act_map.modules}
        self._handles = []
        less = act_map.less.modules if act_map.less is not None else {}
        for name, entry in self._modules.items():
            hook = TransportHook(
                name, act_map.modules[name], self.controls[part_of(name)], entry, less.get(name)
            )
            module = hook_module(entry)
            self._handles.append(module.register_forward_hook(hook))
            setattr(module, _HANDLE_ATTR, self)

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def _parts(self, parts: Iterable[str] | None) -> list[str]:
        parts = list(self.controls) if parts is None else list(parts)
        unknown = [part for part in parts if part not in self.controls]
        if unknown:
            raise ACTInputError(f"This map has no part(s) {unknown}; its parts are {list(self.controls)}.")
        return parts

    def set_strength(self, strength: Strength) -> None:
        """Set lambda for all parts (a number) or per part (a dict such as ``{"unet": 1, "text_encoder": .5}``).

        Every value is checked before any is set, so a bad entry changes nothing.
        """
        values = resolve_strengths(strength, list(self.controls))
        for part, value in values.items():
            self.controls[part].strength = value

    def set_enabled(self, enabled: bool, parts: Iterable[str] | None = None) -> None:
        """Switch transport on or off for every thread, without forgetting the strength."""
        for part in self._parts(parts):
            self.controls[part].enabled = bool(enabled)

    def set_call(
        self,
        parts: Iterable[str] | None = None,
        *,
        rows: slice | torch.Tensor | None = None,
        noise_level: float | None = None,
        in_window: bool = True,
    ) -> None:
        """What the coming model call in this thread needs: the rows to transport (None: all), its noise
        level (time-aware maps pick their buckets from it), and whether it is inside the step window."""
        position = (
            bucket_position(self.act_map.buckets, float(noise_level))
            if self.act_map.buckets is not None and noise_level is not None
            else (0, 0, 0.0)
        )
        for part in self._parts(parts):
            state = self.controls[part].call_state()
            state.rows, state.position, state.in_window = rows, position, bool(in_window)

    def remove(self) -> None:
        """Remove every hook of this handle; the model is exactly as before."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for entry in self._modules.values():
            module = hook_module(entry)
            if getattr(module, _HANDLE_ATTR, None) is self:
                delattr(module, _HANDLE_ATTR)


def active_handle(modules: Mapping[str, nn.Module]) -> ACTHandle | None:
    """The ACT handle currently hooked into any of these modules, if one is."""
    for entry in modules.values():
        handle = getattr(hook_module(entry), _HANDLE_ATTR, None)
        if handle is not None:
            return handle
    return None


def remove_act(modules: Mapping[str, nn.Module]) -> bool:
    """Remove any ACT hooks from these modules (whichever handle added them). True if some were removed."""
    removed = False
    while (handle := active_handle(modules)) is not None:
        handle.remove()
        removed = True
    return removed


def apply_act(modules: Mapping[str, nn.Module], act_map: ACTMap, strength: Strength = 1.0) -> ACTHandle:
    """Hook ``act_map`` into the named modules. Applying again replaces the old map (no stacking).

    ``modules`` maps canonical names to the model's modules (pass all candidates, e.g. every norm
    layer: the map picks its own); a map for another model raises ``ACTModelMismatchError``.
    """
    act_map.check_compatible(widths_of(modules))
    if any(getattr(hook_module(modules[name]), _FOLD_ATTR, None) is not None for name in act_map.modules):
        raise ACTInputError("An ACT map is folded into these weights; unfold it before hooking a map.")
    remove_act(modules)
    return ACTHandle(act_map, modules, strength)


# ---------------------------------------------------------------------------------------- folding
def _foldable_module(name: str, module: nn.Module, module_map: ModuleMap) -> None:
    if module_map.bucketed:
        raise ACTInputError(
            f"Module {name!r} has a time-aware map (one per noise level), and weights cannot change between "
            "denoising steps, so it cannot be folded. Use hooks (enable_act / Apply ACT), or fit a one-bucket "
            "map with the foldable preset."
        )
    if not module_map.foldable:
        raise ACTInputError(
            f"Module {name!r} has a map with bounded support or spatial-mean mode, which is not affine on "
            "every element, so it cannot be folded into weights. Fit with support='unbounded' and "
            "apply_mode='per_element' (the foldable preset), or use hooks."
        )
    if not isinstance(module, FOLDABLE_TYPES) or getattr(module, "weight", None) is None:
        raise ACTInputError(
            f"Cannot fold into {name!r} ({type(module).__name__}): only LayerNorm/GroupNorm with affine "
            "weights, Linear and Conv layers can absorb a map. Use hooks for this module."
        )
    if module.bias is None and bool((module_map.beta != 0).any()):
        raise ACTInputError(f"Cannot fold into {name!r}: it has no bias to absorb the shift. Use hooks.")


def resolve_strengths(strength: Strength, parts: Iterable[str]) -> dict[str, float]:
    """``{part: lambda}`` for a number (every part) or a per-part dict, all values checked first.

    A dict may name only parts in ``parts`` (the map's); parts it leaves out keep strength 0 for folding
    and are left unchanged for hooks (the caller decides), so they are simply absent from the result.
    """
    parts = list(parts)
    if isinstance(strength, Mapping):
        unknown = [part for part in strength if part not in parts]
        if unknown:
            raise ACTInputError(
                f"This map has no part(s) {unknown}; its parts are {parts}. Use a number for all parts, or "
                f"a dict over {parts}."
            )
        return {part: check_strength(value, f"strength for {part}") for part, value in strength.items()}
    value = check_strength(strength)
    return dict.fromkeys(parts, value)


def strength_of(strength: Strength, part: str) -> float:
    """The strength for one part: the number itself, or the part's entry (0 when absent)."""
    if isinstance(strength, Mapping):
        return check_strength(strength.get(part, 0.0), f"strength for {part}")
    return check_strength(strength)


def folded_diffs(
    modules: Mapping[str, nn.Module], act_map: ACTMap, strength: Strength = 1.0
) -> dict[str, torch.Tensor]:
    """Per-parameter diffs ``{"<module>.weight": dW, "<module>.bias": db}`` (float32, CPU) at ``strength``.

    ``W + dW`` and ``b + db`` make the layer output ``x * (1 + lam (omega - 1)) + lam beta``: the hook's
    map with unbounded support. Diffs are linear in lam, so hosts scale diffs computed at lam = 1.
    ``strength`` is a number or per part, as for hooks.
    """
    act_map.check_compatible(widths_of(modules))
    resolve_strengths(strength, act_map.parts())  # unknown parts and bad values fail before any work
    diffs: dict[str, torch.Tensor] = {}
    for name, module_map in act_map.modules.items():
        module = modules[name]
        _foldable_module(name, module, module_map)
        lam = strength_of(strength, part_of(name))
        gain = lam * (module_map.omega - 1.0)
        weight = module.weight.detach().float().cpu()
        view = [-1] + [1] * (weight.ndim - 1)
        diffs[f"{name}.weight"] = weight * gain.view(view)
        if module.bias is not None:
            diffs[f"{name}.bias"] = module.bias.detach().float().cpu() * gain + lam * module_map.beta
    return diffs


class FoldHandle:
    """Weights with a map folded in; ``unfold()`` puts the saved originals back bit for bit."""

    def __init__(self, modules: Mapping[str, nn.Module], act_map: ACTMap, strength: Strength):
        self.act_map = act_map
        self.strength = strength
        self._originals: dict[str, tuple[nn.Module, str, torch.Tensor]] = {}
        diffs = folded_diffs(modules, act_map, strength)
        with torch.no_grad():
            for key, diff in diffs.items():
                module_name, param_name = key.rsplit(".", 1)
                module = modules[module_name]
                param = getattr(module, param_name)
                self._originals[key] = (module, param_name, param.detach().clone())
                param.copy_((param.float() + diff.to(param.device)).to(param.dtype))
                setattr(module, _FOLD_ATTR, self)

    @property
    def folded(self) -> bool:
        return bool(self._originals)

    def unfold(self) -> None:
        """Restore the original weights exactly."""
        with torch.no_grad():
            for module, param_name, original in self._originals.values():
                getattr(module, param_name).copy_(original)
                if getattr(module, _FOLD_ATTR, None) is self:
                    delattr(module, _FOLD_ATTR)
        self._originals.clear()


def fold_act(modules: Mapping[str, nn.Module], act_map: ACTMap, strength: Strength = 1.0) -> FoldHandle:
    """Fold ``act_map`` into the weights at ``strength``; folding again first unfolds the previous map."""
    if act_map.less is not None:
        raise ACTInputError(
            "This map is two-sided (lambda < 0 steers toward its 'less' prompts), and weights hold one side: fold "
            "one side (act_map.side('more') or act_map.side('less')), or use hooks."
        )
    if active_handle({name: modules[name] for name in act_map.modules if name in modules}) is not None:
        raise ACTInputError(
            "ACT hooks are active on these modules; remove them before folding (or it would apply twice)."
        )
    unfold_act(modules)
    return FoldHandle(modules, act_map, strength)


def active_fold(modules: Mapping[str, nn.Module]) -> FoldHandle | None:
    """The fold handle whose map is folded into any of these modules, if one is."""
    for module in modules.values():
        handle = getattr(module, _FOLD_ATTR, None)
        if handle is not None:
            return handle
    return None


def unfold_act(modules: Mapping[str, nn.Module]) -> bool:
    """Undo any folded map on these modules. True if something was unfolded."""
    unfolded = False
    while (handle := active_fold(modules)) is not None:
        handle.unfold()
        unfolded = True
    return unfolded

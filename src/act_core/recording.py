"""Record pooled activations of named modules, in the order the modules actually run.

Only pooled vectors are kept (one per sample per call, float32), so recording hundreds of prompts on
hundreds of modules stays small. They stay on the activation's device: pooling reads nothing back to the
host (no per-module device sync in a fit's hot path), and the estimators work where the samples are.
Pooling follows the spec: mean over real tokens for (B, T, D) outputs (the host marks real tokens with
``token_mask``), mean over spatial axes for (B, C, H, W) outputs, identity for (B, D).
"""

from __future__ import annotations

import contextlib
import contextvars
import fnmatch
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import ACTInputError

_TOKEN_MASK: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar(
    "act_token_mask", default=None
)


@contextlib.contextmanager
def token_mask(mask: torch.Tensor | None) -> Iterator[None]:
    """Mark the real (non-padding) tokens of the batch the host is about to run.

    While active, (B, T, D) outputs whose (B, T) matches the mask's shape are pooled over the masked
    tokens only. Context-local, so concurrent fitting threads each keep their own mask.
    """
    reset = _TOKEN_MASK.set(mask)
    try:
        yield
    finally:
        _TOKEN_MASK.reset(reset)


_MASK_STACK = threading.local()


def _push_token_mask(mask: torch.Tensor | None) -> None:
    _MASK_STACK.__dict__.setdefault("tokens", []).append(_TOKEN_MASK.set(mask))


def _pop_token_mask() -> None:
    tokens = _MASK_STACK.__dict__.get("tokens")
    if tokens:
        _TOKEN_MASK.reset(tokens.pop())


def token_mask_hooks(
    module: nn.Module, mask_of: Callable[[tuple, dict], torch.Tensor | None]
) -> list[torch.utils.hooks.RemovableHandle]:
    """Hooks that hold ``token_mask(mask_of(args, kwargs))`` for the duration of each ``module`` forward.

    For hosts that learn the real tokens only when a text encoder is called (from its input ids).
    The closing hook runs even when the forward raises, so no stale mask outlives a failed call; the
    masks stack per thread, because lockstep fitting runs several batches' forwards at once.
    """
    return [
        module.register_forward_pre_hook(
            lambda _module, args, kwargs: _push_token_mask(mask_of(args, kwargs)), with_kwargs=True
        ),
        module.register_forward_hook(lambda _module, args, output: _pop_token_mask(), always_call=True),
    ]


class ForwardHooks:
    """Context manager that registers ``self._make_hook(name)`` on every module and removes them on exit."""

    modules: dict[str, nn.Module]

    def _make_hook(self, name: str) -> Any:
        raise NotImplementedError

    def __enter__(self):
        self._handles = [
            hook_module(module).register_forward_hook(self._make_hook(name))
            for name, module in self.modules.items()
        ]
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


@dataclass(frozen=True, eq=False)
class OutputOf:
    """One stream of a module's tuple output, hooked as if it were a module of its own.

    ``index`` is the element of the output (FLUX's double blocks return ``(text, image)``), or a tuple of
    elements taken together, concatenated along the token axis (a FLUX single block's text and image
    tokens, which diffusers returns split and ComfyUI joined: the same stream either way). ``width`` is
    the stream's number of units.
    """

    module: nn.Module
    index: int | tuple[int, ...]
    width: int


Hooked = "nn.Module | OutputOf"


def hook_module(entry: nn.Module | OutputOf) -> nn.Module:
    """The module whose forward hooks see ``entry``."""
    return entry.module if isinstance(entry, OutputOf) else entry


def read_output(entry: nn.Module | OutputOf, output: Any) -> torch.Tensor | None:
    """The activation ``entry`` stands for in ``output`` (a module's first tensor, or an OutputOf's stream)."""
    if not isinstance(entry, OutputOf):
        return first_tensor(output)
    if isinstance(entry.index, tuple):
        return torch.cat([output[i] for i in entry.index], dim=1)
    return output[entry.index]


def write_output(entry: nn.Module | OutputOf, output: Any, tensor: torch.Tensor) -> Any:
    """``output`` with the activation of ``entry`` replaced by ``tensor`` (structure kept)."""
    if not isinstance(entry, OutputOf):
        return replace_first_tensor(output, tensor)
    items = list(output)
    if isinstance(entry.index, tuple):
        sizes = [items[i].shape[1] for i in entry.index]
        for i, part in zip(entry.index, torch.split(tensor, sizes, dim=1), strict=True):
            items[i] = part
    else:
        items[entry.index] = tensor
    return type(output)(items) if isinstance(output, list) else tuple(items)


def channel_axis(ndim: int) -> int:
    """Axis holding the units: dim 1 for conv feature maps (B, C, H, W, ...), the last dim otherwise."""
    return 1 if ndim >= 4 else ndim - 1


def first_tensor(output: Any) -> torch.Tensor | None:
    """The activation tensor of a module output (a tensor, or the first element of a tuple/list)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def replace_first_tensor(output: Any, tensor: torch.Tensor) -> Any:
    """Return ``output`` with its activation tensor replaced, keeping tuple structure intact."""
    if isinstance(output, torch.Tensor):
        return tensor
    return type(output)([tensor, *output[1:]]) if isinstance(output, list) else (tensor, *output[1:])


_MASK_ON_DEVICE = threading.local()


def _mask_weights(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``mask`` as (B, T, 1) weights on ``like``'s device and dtype, converted once per mask and device.

    A host's mask is often on the CPU (built from token ids) while the activations are on an accelerator:
    every hooked module of the encoder pools with the same mask, and a copy per module would be a device
    sync per module. The last conversion is kept per thread (lockstep fitting runs batches in threads).
    """
    key = (mask, like.device, like.dtype)
    cached = getattr(_MASK_ON_DEVICE, "entry", None)
    if cached is not None and cached[0] is mask and cached[1:3] == key[1:]:
        return cached[3]
    weights = mask.to(device=like.device, dtype=like.dtype).unsqueeze(-1)
    _MASK_ON_DEVICE.entry = (*key, weights)
    return weights


def _owned(samples: torch.Tensor, activation: torch.Tensor) -> torch.Tensor:
    """``samples``, copied if they are a view of ``activation`` (a float32 2-D output, or tokens kept as
    they are): kept samples must not change when the model later writes into its activation."""
    if samples.untyped_storage().data_ptr() == activation.untyped_storage().data_ptr():
        return samples.clone()
    return samples


def pool(activation: torch.Tensor) -> torch.Tensor:
    """One vector per sample: (B, D) float32 on the activation's device (see the module docstring for the rule)."""
    x = activation.detach().float()
    if x.ndim == 2:
        pooled = x
    elif x.ndim == 3:
        mask = _TOKEN_MASK.get()
        if mask is not None and tuple(mask.shape) == tuple(x.shape[:2]):
            weights = _mask_weights(mask, x)
            pooled = (x * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
        else:
            pooled = x.mean(dim=1)
    elif x.ndim >= 4:
        pooled = x.flatten(2).mean(dim=2)
    else:
        raise ACTInputError(
            f"Cannot pool a {x.ndim}-D activation of shape {tuple(x.shape)}; expected 2-D or more."
        )
    return _owned(pooled, activation)


STATISTICS = ("mean", "positions")
# Positions kept per sample for the "positions" statistic (evenly spaced; all when there are fewer).
MAX_POSITIONS = 256


def positions(activation: torch.Tensor, max_positions: int = MAX_POSITIONS) -> torch.Tensor:
    """Every spatial position (or token) of every sample as a sample of its own: (B * P, D) float32, on the
    activation's device.

    The "positions" statistic: where ``pool`` keeps one mean per sample, this keeps the distribution
    of values across a feature map, which is what a texture (stripes, dots) changes and a mean does not
    see. Positions are subsampled evenly to at most ``max_positions`` per sample, the same ones for every
    row, so source and target samples stay paired by position.
    """
    x = activation.detach().float()
    if x.ndim == 2:
        return _owned(x, activation)
    x = x.transpose(1, 2) if x.ndim == 3 else x.flatten(2)  # (B, D, T) or (B, C, H*W)
    count = x.shape[2]
    if count > max_positions:
        index = torch.linspace(0, count - 1, max_positions, device=x.device).round().long()
        x = x[:, :, index]
    return _owned(x.transpose(1, 2).reshape(-1, x.shape[1]), activation)


def module_width(module: nn.Module | OutputOf) -> int | None:
    """Number of output units of common layers (None when it is only known after a forward)."""
    if isinstance(module, OutputOf):
        return module.width
    if isinstance(module, nn.LayerNorm):
        return int(module.normalized_shape[-1])
    if isinstance(module, nn.GroupNorm):
        return int(module.num_channels)
    if isinstance(module, nn.Linear):
        return int(module.out_features)
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return int(module.out_channels)
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.ndim == 1:  # RMSNorm and other custom norms
        return int(weight.shape[0])
    return None


def select_modules(
    root: nn.Module,
    patterns: Iterable[str] = ("*",),
    types: tuple[type, ...] | None = None,
    prefix: str = "",
    exclude: Iterable[str] = (),
) -> dict[str, nn.Module]:
    """Modules of ``root`` whose name matches a glob in ``patterns`` (and is an instance of ``types``).

    Names are ``prefix + name`` (e.g. ``"unet." + "down_blocks.0..."``) so several model parts can share
    one map; patterns and excludes match the name without the prefix. Registration order is kept; the
    execution order is learned while recording.
    """
    patterns, exclude = list(patterns), list(exclude)
    selected = {}
    for name, module in root.named_modules():
        if not name or (types is not None and not isinstance(module, types)):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in patterns) and not any(
            fnmatch.fnmatchcase(name, p) for p in exclude
        ):
            selected[prefix + name] = module
    return selected


def widths_of(modules: Mapping[str, nn.Module]) -> dict[str, int | None]:
    """Module name -> output width, for compatibility checks and fingerprints."""
    return {name: module_width(module) for name, module in modules.items()}


class ActivationRecorder(ForwardHooks):
    """Context manager that records pooled outputs of named modules and their execution order.

    >>> with ActivationRecorder(select_modules(model, ["*norm*"])) as recorder:
    ...     model(batch)
    >>> recorder.samples("encoder.layers.0.layer_norm1").shape   # (num_samples, width)
    """

    def __init__(self, modules: Mapping[str, nn.Module]):
        if not modules:
            raise ACTInputError(
                "No modules to record: the module selection matched nothing. Check the patterns."
            )
        self.modules = dict(modules)
        self.execution_order: list[str] = []
        self._samples: dict[str, list[torch.Tensor]] = {name: [] for name in self.modules}

    def _make_hook(self, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            activation = read_output(self.modules[name], output)
            if activation is None:
                raise ACTInputError(
                    f"Module {name!r} returned {type(output).__name__}, not a tensor; it cannot be recorded."
                )
            if not self._samples[name]:
                self.execution_order.append(name)
            self._samples[name].append(pool(activation))

        return hook

    def samples(self, name: str) -> torch.Tensor:
        """All pooled samples recorded at ``name``: (num_samples, width), on the device the module ran on."""
        if not self._samples.get(name):
            raise ACTInputError(
                f"Module {name!r} never ran while recording. Check that the host actually runs it "
                "(e.g. a text encoder layer whose output the pipeline never uses)."
            )
        return torch.cat(self._samples[name], dim=0)

    def recorded(self) -> list[str]:
        """Names of modules that produced samples, in execution order."""
        return [name for name in self.execution_order if self._samples[name]]

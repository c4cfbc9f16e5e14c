"""ACTMap: the fitted per-module transport maps plus the metadata needed to reuse them safely.

A map is a dict of ``ModuleMap`` (one per hooked module, in execution order) and a JSON-able metadata
dict. It saves to a single safetensors file (a format that cannot run code) with the metadata in the
header, and is written atomically so an interrupted save never leaves a half-written file.

Time-aware maps hold one (omega, beta, support) per *noise-level bucket*: ``ACTMap.buckets`` lists the
noise levels (``u`` in [0, 1]: timestep / number of training timesteps for discrete-time models such as
SDXL, sigma for flow models such as FLUX; 1 = pure noise) and the tensors of time-aware modules are
``(K, D)``; modules that run once per image (text encoders) keep ``(D,)`` tensors.
At generation the hooks interpolate between the two buckets around the current noise level, so a map
fitted with 25 steps applies at 12 or 40 steps and with another scheduler. Maps without buckets hold
``(D,)`` tensors and act the same at every step (the paper's protocol).

Two-sided maps (``ACTMap.less``) carry a second map over the same modules, fitted toward the "less" prompts:
lambda > 0 applies the map itself (toward the "more" prompts), lambda < 0 applies ``less`` with |lambda|, so
one slider runs from "as if prompted with the less side" (-1) through the model (0) to the "more" side (+1).

File format (safetensors header ``format: act_map``): version 1 has one-bucket maps only; version 2
adds the ``buckets`` header entry (a JSON list, or null) and ``(K, D)`` tensors; version 3 (written only
for two-sided maps) adds the ``less`` header entry (the less side's metadata) and its tensors, keyed
``less:<module>.<field>``. All three load.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import validation
from ._version import __version__
from .apply_modes import APPLY_MODES, APPLY_PER_ELEMENT, APPLY_SPATIAL_MEAN  # noqa: F401 - re-exported
from .errors import ACTInputError, ACTMapFileError, ACTModelMismatchError
from .files import atomic_write

FILE_FORMAT = "act_map"
FILE_FORMAT_VERSION = "2"
TWO_SIDED_FORMAT_VERSION = "3"
READABLE_VERSIONS = ("1", "2", "3")
LESS_PREFIX = "less:"
_TENSOR_FIELDS = ("omega", "beta", "low", "high")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Largest |omega| and |beta| a map may hold. Fitted maps are bounded far below this (see
# estimators.MAX_OMEGA); larger values only come from broken files and would render NaN.
MAX_OMEGA_MAGNITUDE = validation.MAX_OMEGA_MAGNITUDE
MAX_BETA_MAGNITUDE = 1e6


@dataclass
class ModuleMap:
    """The affine map ``T(x) = omega * x + beta`` of one module, applied where ``low < x < high``.

    Tensors are ``(D,)`` (one map for every denoising step) or ``(K, D)`` (one row per noise-level
    bucket of the owning ``ACTMap``). ``apply_mode`` says how 4-D (B, C, H, W) outputs are transported:
    ``per_element`` maps every element; ``spatial_mean`` (the reference's choice for UNet feature maps)
    maps only the per-channel spatial mean and adds the resulting shift to every position. 2-D and 3-D
    outputs are always mapped per element along their last axis.
    """

    omega: torch.Tensor
    beta: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor
    apply_mode: str = APPLY_PER_ELEMENT
    _unbounded: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        shapes = set()
        for name in _TENSOR_FIELDS:
            value = torch.as_tensor(getattr(self, name)).detach().to(device="cpu", dtype=torch.float32)
            if value.ndim == 0 or value.ndim > 2:
                value = value.flatten()
            setattr(self, name, value.contiguous())
            shapes.add(tuple(value.shape))
        if len(shapes) != 1:
            raise ACTInputError(
                f"omega, beta, low and high must have the same length and shape, got {sorted(shapes)} "
                "((D,) for one map, (K, D) for K noise-level buckets)."
            )
        if self.apply_mode not in APPLY_MODES:
            raise ACTInputError(f"apply_mode must be one of {APPLY_MODES}, got {self.apply_mode!r}.")
        if not (torch.isfinite(self.omega).all() and torch.isfinite(self.beta).all()):
            raise ACTInputError(
                "omega and beta must be finite; the activations they were fitted on were not."
            )
        if self.omega.abs().max() > MAX_OMEGA_MAGNITUDE or self.beta.abs().max() > MAX_BETA_MAGNITUDE:
            raise ACTInputError(
                f"omega or beta is implausibly large (|omega| up to {self.omega.abs().max().item():.3g}, "
                f"|beta| up to {self.beta.abs().max().item():.3g}; limits {MAX_OMEGA_MAGNITUDE:g} and "
                f"{MAX_BETA_MAGNITUDE:g}): such a map would render NaN. Re-fit it."
            )
        if torch.isnan(self.low).any() or torch.isnan(self.high).any():
            raise ACTInputError("The support bounds (low, high) contain NaN; re-fit the map.")
        if (self.low > self.high).any():
            raise ACTInputError(
                "The support bounds are swapped (low > high) for some units, so the map would never apply "
                "there; re-fit the map."
            )
        # computed once: the hooks ask on every call
        self._unbounded = bool(torch.isneginf(self.low).all() and torch.isposinf(self.high).all())

    @property
    def width(self) -> int:
        """Number of units (channels) the map acts on."""
        return int(self.omega.shape[-1])

    @property
    def num_buckets(self) -> int:
        """Noise-level buckets (1 for a map that acts the same at every step)."""
        return 1 if self.omega.ndim == 1 else int(self.omega.shape[0])

    @property
    def bucketed(self) -> bool:
        return self.omega.ndim == 2

    def bucket(self, index: int) -> ModuleMap:
        """The one-bucket map of bucket ``index`` (the map itself when it has no buckets)."""
        if not self.bucketed:
            return self
        return replace(
            self,
            **{name: getattr(self, name)[index] for name in _TENSOR_FIELDS},
        )

    @property
    def unbounded(self) -> bool:
        """True when the support mask is always on (needed for folding into weights)."""
        return self._unbounded

    @property
    def foldable(self) -> bool:
        """Affine on every element at every step, so it can be written into the producing layer's weights."""
        return self.unbounded and self.apply_mode == APPLY_PER_ELEMENT and not self.bucketed

    def equal(self, other: ModuleMap) -> bool:
        """Exact equality of all tensors and the apply mode."""
        return self.apply_mode == other.apply_mode and all(
            torch.equal(getattr(self, name), getattr(other, name)) for name in _TENSOR_FIELDS
        )


def check_buckets(buckets: Sequence[float] | None) -> tuple[float, ...] | None:
    """Validate noise levels: finite, in [0, 1], distinct. None means a map without buckets."""
    if buckets is None:
        return None
    if isinstance(buckets, (str, bytes, Mapping)):
        raise ACTInputError(f"buckets must be a list of noise levels in [0, 1], got {buckets!r}.")
    try:
        items = list(buckets)
    except TypeError:
        raise ACTInputError(f"buckets must be a list of noise levels in [0, 1], got {buckets!r}.") from None
    for index, u in enumerate(items):
        if isinstance(u, (bool, str, bytes)):  # float() reads "0.5" and True: neither is a noise level
            raise ACTInputError(
                f"Noise level {index} of the buckets is {type(u).__name__} {u!r}, not a number; noise levels "
                "are numbers in [0, 1] (1 = pure noise)."
            )
    try:
        levels = tuple(float(u) for u in items)
    except (TypeError, ValueError):
        raise ACTInputError(f"buckets must be a list of noise levels in [0, 1], got {buckets!r}.") from None
    if not levels:
        raise ACTInputError("buckets is empty; use None for a map without noise-level buckets.")
    if not all(math.isfinite(u) and 0.0 <= u <= 1.0 for u in levels):
        raise ACTInputError(f"Noise levels must be finite numbers in [0, 1], got {list(levels)}.")
    if len(set(levels)) != len(levels):
        raise ACTInputError(f"Noise levels must be distinct, got {list(levels)}.")
    return levels


@dataclass
class ACTMap:
    """Per-module transport maps (in execution order), metadata, and optional noise-level buckets."""

    modules: dict[str, ModuleMap]
    metadata: dict[str, Any] = field(default_factory=dict)
    buckets: tuple[float, ...] | None = None
    # Two-sided maps: the map lambda < 0 applies (with |lambda|), fitted toward the "less" prompts.
    less: ACTMap | None = None

    def __post_init__(self) -> None:
        if not self.modules:
            raise ACTInputError("An ACT map needs at least one module map.")
        if self.less is not None:
            self._check_less(self.less)
        self.modules = dict(self.modules)
        self.buckets = check_buckets(self.buckets)
        for name, module_map in self.modules.items():
            if module_map.bucketed and (self.buckets is None or module_map.num_buckets != len(self.buckets)):
                raise ACTInputError(
                    f"Module {name!r} has {module_map.num_buckets} noise-level buckets ((K, D) tensors) but the "
                    f"map has {'no buckets' if self.buckets is None else f'{len(self.buckets)} buckets'}; every "
                    "time-aware module needs one row per bucket."
                )
        if self.buckets is not None and not any(m.bucketed for m in self.modules.values()):
            raise ACTInputError(
                "The map lists noise-level buckets but no module has per-bucket tensors; use buckets=None."
            )
        if not isinstance(self.metadata, Mapping):
            raise ACTInputError(
                f"ACT map metadata must be a JSON object (a dict), got {type(self.metadata).__name__}."
            )
        try:
            # Round-trip through JSON so a map equals its saved-and-loaded copy (tuples become lists).
            self.metadata = json.loads(json.dumps(dict(self.metadata)))
        except (TypeError, ValueError) as error:
            raise ACTInputError(f"ACT map metadata must be JSON-serialisable: {error}") from None

    def _check_less(self, less: ACTMap) -> None:
        """The less side hooks the same modules, with the same widths, modes and buckets (one slider)."""
        if not isinstance(less, ACTMap) or less.less is not None:
            raise ACTInputError("The less side of a two-sided map must be a one-sided ACTMap.")
        if list(less.modules) != list(self.modules) or less.buckets != self.buckets:
            raise ACTInputError(
                "The two sides of a two-sided map must hook the same modules at the same noise levels; fit both "
                "with the same preset and sampling settings."
            )
        for name, module_map in self.modules.items():
            other = less.modules[name]
            if (other.width, other.apply_mode, other.bucketed) != (
                module_map.width,
                module_map.apply_mode,
                module_map.bucketed,
            ):
                raise ACTInputError(f"The two sides of this map differ at module {name!r} (width or mode).")

    def side(self, which: str) -> ACTMap:
        """One side of a two-sided map as a one-sided map: ``"more"`` (lambda > 0) or ``"less"`` (lambda < 0)."""
        if which not in ("more", "less"):
            raise ACTInputError(f"A map's sides are 'more' and 'less', not {which!r}.")
        if which == "less":
            if self.less is None:
                raise ACTInputError(
                    "This map is one-sided: it has no 'less' side (fit it with less prompts)."
                )
            return self.less
        return ACTMap(self.modules, self.metadata, self.buckets)

    @property
    def two_sided(self) -> bool:
        """Whether lambda < 0 steers toward "less" prompts (else it extrapolates the map backwards)."""
        return self.less is not None

    # ----------------------------------------------------------------------------------- inspection
    def __len__(self) -> int:
        return len(self.modules)

    @property
    def widths(self) -> dict[str, int]:
        """Module name -> number of units: what a model must provide for this map to apply."""
        return {name: module_map.width for name, module_map in self.modules.items()}

    @property
    def foldable(self) -> bool:
        """True when every module map can be written into weights."""
        return all(module_map.foldable for module_map in self.modules.values())

    def parts(self) -> list[str]:
        """Model parts the map touches: the first dotted component of each module name ("unet", ...)."""
        return sorted({part_of(name) for name in self.modules})

    def equal(self, other: ACTMap) -> bool:
        """Same module names in the same order, identical tensors and identical metadata."""
        return (
            list(self.modules) == list(other.modules)
            and all(self.modules[name].equal(other.modules[name]) for name in self.modules)
            and self.metadata == other.metadata
            and self.buckets == other.buckets
            and (self.less is None) == (other.less is None)
            and (self.less is None or self.less.equal(other.less))
        )

    def summary(self) -> str:
        """A short human-readable description (used by the CLI's ``info``)."""
        lines = [f"ACT map: {len(self)} modules, {sum(self.widths.values())} units"]
        for key in (
            "method",
            "support",
            "mode",
            "apply_mode",
            "protocol",
            "cfg_rows",
            "num_source",
            "num_target",
            "preset",
            "model",
        ):
            if key in self.metadata:
                lines.append(f"  {key}: {self.metadata[key]}")
        recorded = self.metadata.get("source_prompts")
        if (
            recorded
        ):  # fits record them so that the map folds later without them (act_core.distill.fold_prompts)
            lines.append(f"  source prompts: {len(recorded)} recorded (a fold uses them)")
        lines.append(f"  noise-level buckets: {describe_buckets(self.buckets)}")
        if self.less is not None:
            lines.append(
                "  two-sided: lambda > 0 toward the target prompts, lambda < 0 toward the less prompts "
                f"({self.less.metadata.get('num_target', '?')} of them)"
            )
        for part in self.parts():
            names = [name for name in self.modules if part_of(name) == part]
            lines.append(
                f"  part {part}: {len(names)} modules, foldable={self.restrict(parts=[part]).foldable}"
            )
        return "\n".join(lines)

    # ----------------------------------------------------------------------------------- algebra
    def with_metadata(self, extra: Mapping[str, Any]) -> ACTMap:
        """The same map with ``extra`` merged into its metadata."""
        return ACTMap(self.modules, {**self.metadata, **extra}, self.buckets, self.less)

    def restrict(
        self,
        names: Iterable[str] | None = None,
        patterns: Iterable[str] | None = None,
        parts: Iterable[str] | None = None,
    ) -> ACTMap:
        """A map with only the modules that match every given filter (exact names, globs, parts).

        ``parts`` is a list of part names such as ``["unet"]``. The result keeps the noise-level buckets
        when one of its modules is time-aware, and has none otherwise (e.g. the text-encoder part of a
        time-aware map).
        """
        from .validation import check_parts

        names = None if names is None else set(names)
        patterns = None if patterns is None else list(patterns)
        parts = None if parts is None else set(check_parts(parts, self.parts(), "module part"))
        kept = {
            name: module_map
            for name, module_map in self.modules.items()
            if (names is None or name in names)
            and (patterns is None or any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns))
            and (parts is None or part_of(name) in parts)
        }
        if not kept:
            raise ACTInputError(
                f"No module of this map matches names={names}, patterns={patterns}, parts={parts}; "
                f"the map's parts are {self.parts()}."
            )
        metadata = dict(self.metadata, restricted_from=len(self.modules))
        buckets = self.buckets if any(module_map.bucketed for module_map in kept.values()) else None
        less = None
        if self.less is not None:
            less = ACTMap({name: self.less.modules[name] for name in kept}, self.less.metadata, buckets)
        return ACTMap(kept, metadata, buckets, less)

    def compose(self, other: ACTMap) -> ACTMap:
        """The map that applies ``self`` first, then ``other`` (on modules both contain).

        For a module in both, the affine maps compose: ``omega = w2 * w1``, ``beta = w2 * b1 + b2``. The
        composed support is where the first map applies and its image lies in the second's support, so
        the result is exact wherever both maps are active (always, for unbounded supports); values in
        only one support are left unchanged rather than half-transported. Modules in only one map keep
        their map. The order follows ``self``, then modules new in ``other``.
        """
        if self.less is not None or other.less is not None:
            raise ACTInputError(
                "Two-sided maps do not compose (which side would lambda < 0 take?); compose one-sided maps."
            )
        if self.buckets != other.buckets:
            raise ACTInputError(
                "Cannot compose maps with different noise-level buckets "
                f"({describe_buckets(self.buckets)} vs {describe_buckets(other.buckets)}); fit both with the "
                "same sampling settings."
            )
        shared = _composed_provenance(self, other)
        composed: dict[str, ModuleMap] = {}
        for name in list(self.modules) + [n for n in other.modules if n not in self.modules]:
            first, second = self.modules.get(name), other.modules.get(name)
            if first is None or second is None:
                composed[name] = first or second
                continue
            if first.width != second.width:
                raise ACTModelMismatchError(
                    f"Cannot compose maps for module {name!r}: widths {first.width} and {second.width} differ. "
                    "Both maps must be fitted on the same model."
                )
            if first.apply_mode != second.apply_mode:
                raise ACTInputError(
                    f"Cannot compose maps for module {name!r}: apply modes {first.apply_mode} and "
                    f"{second.apply_mode} differ. Fit both with the same apply_mode."
                )
            composed[name] = _compose_pair(first, second)
        metadata = {
            "method": "composed",
            **shared,
            "composed_of": [self.metadata, other.metadata],
            "act_version": __version__,
        }
        return ACTMap(composed, metadata, self.buckets)

    # ----------------------------------------------------------------------------------- checking
    def check_compatible(self, model_widths: Mapping[str, int | None], *, what: str = "this model") -> None:
        """Raise ``ACTModelMismatchError`` when a module is missing from the model or has another width.

        ``model_widths`` maps the model's module names to their widths (None when unknown: only the
        name is checked, the width is checked when the hook first runs).
        """
        missing = [name for name in self.modules if name not in model_widths]
        if missing:
            raise ACTModelMismatchError(
                f"This ACT map does not fit {what}: {len(missing)} of its {len(self)} modules are missing "
                f"(first: {missing[0]!r}). It was fitted on another model "
                f"({self.metadata.get('model', 'unknown model')}). Fit a map for this model, or use "
                "restrict(...) to keep only modules it has."
            )
        for name, width in self.widths.items():
            model_width = model_widths[name]
            if model_width is not None and model_width != width:
                raise ACTModelMismatchError(
                    f"This ACT map does not fit {what}: module {name!r} has {model_width} units but the map "
                    f"has {width}. It was fitted on another model ({self.metadata.get('model', 'unknown')}); "
                    "fit a map for this model."
                )

    # ----------------------------------------------------------------------------------- files
    def save(self, path: str | os.PathLike) -> Path:
        """Write the map as safetensors (tensors + JSON metadata in the header), atomically.

        Returns the path written (a symlink's target when ``path`` is a symlink).
        """
        path = Path(path)
        if path.suffix != ".safetensors":
            raise ACTInputError(f"ACT maps are saved as .safetensors files; got {path.name!r}.")
        tensors = _tensors_of(self.modules)
        header = {
            "format": FILE_FORMAT,
            "format_version": FILE_FORMAT_VERSION if self.less is None else TWO_SIDED_FORMAT_VERSION,
            "modules": json.dumps(
                [{"name": n, "width": m.width, "apply_mode": m.apply_mode} for n, m in self.modules.items()]
            ),
            "buckets": json.dumps(None if self.buckets is None else list(self.buckets)),
            "metadata": json.dumps(self.metadata),
        }
        if self.less is not None:
            tensors.update(_tensors_of(self.less.modules, LESS_PREFIX))
            header["less"] = json.dumps({"metadata": self.less.metadata})
        return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))

    @classmethod
    def load(cls, path: str | os.PathLike) -> ACTMap:
        """Read a map written by ``save`` (format version 1 or 2). Never unpickles; validates everything."""
        path = Path(path)
        if not path.is_file():
            raise ACTMapFileError(
                f"ACT map file not found: {str(path)!r}. Check the path (maps end in .safetensors)."
            )
        try:
            with safe_open(str(path), framework="pt") as handle:
                header = handle.metadata() or {}
                keys = set(handle.keys())
                entries, metadata, buckets, less_metadata = _read_header(path.name, header)
                modules = _read_modules(handle, path.name, entries, buckets, keys, "")
                less_modules = None
                if less_metadata is not None:
                    less_modules = _read_modules(handle, path.name, entries, buckets, keys, LESS_PREFIX)
                if keys:
                    raise ACTMapFileError(
                        f"{path.name} is inconsistent: its header lists {len(entries)} modules but the file "
                        f"holds {len(keys)} more tensor(s) (first: {sorted(keys)[0]!r}). Re-save the map."
                    )
        except ACTMapFileError:
            raise
        except Exception as error:  # safetensors raises its own error types for truncated/corrupt headers
            raise ACTMapFileError(
                f"Cannot read ACT map {path.name}: the file is corrupted or truncated ({type(error).__name__}: "
                f"{error}). Re-save or re-fit the map."
            ) from None
        try:
            less = None if less_modules is None else cls(less_modules, less_metadata, buckets)
            return cls(modules, metadata, buckets, less)
        except ACTInputError as error:
            raise ACTMapFileError(f"{path.name} is not a valid ACT map: {error}") from None


def _tensors_of(modules: Mapping[str, ModuleMap], prefix: str = "") -> dict[str, torch.Tensor]:
    return {
        f"{prefix}{name}.{field_name}": getattr(module_map, field_name)
        for name, module_map in modules.items()
        for field_name in _TENSOR_FIELDS
    }


def _read_modules(
    handle: Any, file_name: str, entries: list[dict], buckets: tuple | None, keys: set[str], prefix: str
) -> dict[str, ModuleMap]:
    """The module maps of one side of a map file (``prefix`` ``less:`` for the less side); read keys are
    removed from ``keys`` so the caller can refuse leftovers."""
    modules = {}
    for entry in entries:
        name = entry["name"]
        fields = {}
        for field_name in _TENSOR_FIELDS:
            key = f"{prefix}{name}.{field_name}"
            if key not in keys:
                raise ACTMapFileError(
                    f"{file_name} is incomplete: tensor {key!r} is missing. Re-save the map."
                )
            keys.discard(key)
            tensor = handle.get_tensor(key)
            if tensor.dtype not in _FLOAT_DTYPES:
                raise ACTMapFileError(
                    f"{file_name} is not a valid ACT map: tensor {key!r} is {tensor.dtype}, not a "
                    "floating-point type. Re-fit the map; never edit map files by hand."
                )
            fields[field_name] = tensor
        shape = tuple(fields["omega"].shape)
        expected = [(entry["width"],)] + ([] if buckets is None else [(len(buckets), entry["width"])])
        if shape not in expected:
            raise ACTMapFileError(
                f"{file_name} is inconsistent: module {prefix}{name!r} has tensors of shape {shape}, the header "
                f"says {' or '.join(map(str, expected))}. Re-save the map."
            )
        try:
            modules[name] = ModuleMap(**fields, apply_mode=entry["apply_mode"])
        except ACTInputError as error:
            raise ACTMapFileError(f"{file_name}: module {prefix}{name!r}: {error}") from None
    return modules


def _read_header(
    file_name: str, header: Mapping[str, str]
) -> tuple[list[dict], dict, tuple | None, dict | None]:
    """(module entries, metadata, buckets, the less side's metadata or None) of a map file's header, or
    ``ACTMapFileError`` naming the problem."""
    if header.get("format") != FILE_FORMAT:
        raise ACTMapFileError(
            f"{file_name} is a safetensors file but not an ACT map (no 'format: {FILE_FORMAT}' "
            "header). Export LoRA files are not maps; load the map you saved with ACTMap.save."
        )
    version = header.get("format_version")
    if version not in READABLE_VERSIONS:
        raise ACTMapFileError(
            f"{file_name} uses ACT map format version {version!r}; this library reads versions "
            f"{', '.join(READABLE_VERSIONS)}. Upgrade comfyui-act or re-fit the map."
        )

    def parse(key: str, default: str) -> Any:
        try:
            return json.loads(header.get(key, default))
        except ValueError:
            raise ACTMapFileError(f"{file_name}: the header's {key!r} entry is not valid JSON.") from None

    entries = parse("modules", "[]")
    if not isinstance(entries, list) or not entries:
        raise ACTMapFileError(f"{file_name} lists no modules in its header; it is not a usable ACT map.")
    names = []
    for entry in entries:
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("name"), str)
            and isinstance(entry.get("width"), int)
            and entry["width"] > 0
            and entry.get("apply_mode") in APPLY_MODES
        ):
            raise ACTMapFileError(f"{file_name}: malformed module entry {entry!r} in the header.")
        names.append(entry["name"])
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise ACTMapFileError(f"{file_name} lists module {duplicated[0]!r} more than once; re-save the map.")
    metadata = parse("metadata", "{}")
    if not isinstance(metadata, dict):
        raise ACTMapFileError(
            f"{file_name}: the header's metadata must be a JSON object, got {type(metadata).__name__}."
        )
    buckets = parse("buckets", "null") if version != "1" else None
    if buckets is not None:
        try:
            buckets = check_buckets(buckets)
        except ACTInputError as error:
            raise ACTMapFileError(f"{file_name}: {error}") from None
    less = None
    if version == TWO_SIDED_FORMAT_VERSION:
        less = parse("less", "null")
        if not (isinstance(less, dict) and isinstance(less.get("metadata"), dict)):
            raise ACTMapFileError(
                f"{file_name}: a two-sided map (format version 3) needs a 'less' header entry with its metadata."
            )
        less = less["metadata"]
    return entries, metadata, buckets, less


def _composed_provenance(first: ACTMap, second: ACTMap) -> dict[str, Any]:
    """The ``family`` and ``cfg_rows`` a composition of two maps keeps, or ``ACTInputError``.

    Maps without ``family`` are SDXL's and maps without ``cfg_rows`` steer the prompt's rows ("cond"),
    as every consumer reads them. ``cfg_rows`` only matters for denoiser modules: two maps that both
    steer the denoiser must agree; a map of text-encoder modules only takes the other's.
    """
    from .families import SDXL, get_family

    kept: dict[str, Any] = {}
    families = [str(m.metadata.get("family", SDXL.name)) for m in (first, second)]
    if families[0] != families[1]:
        raise ACTInputError(
            f"Cannot compose a map fitted on {families[0]} with one fitted on {families[1]}: their modules "
            "belong to different models. Compose maps of the same model family."
        )
    if any("family" in m.metadata for m in (first, second)):
        kept["family"] = families[0]
    denoiser = get_family(families[0]).denoiser
    steering = [m for m in (first, second) if denoiser in m.parts()]
    if len(steering) == 2:
        rows = [str(m.metadata.get("cfg_rows", "cond")) for m in steering]
        if rows[0] != rows[1]:
            raise ACTInputError(
                f"Cannot compose a map with cfg_rows={rows[0]!r} with one with cfg_rows={rows[1]!r}: on the "
                f"{denoiser} they steer different rows of the CFG batch. Fit both with the same preset's "
                "cfg_rows."
            )
    with_rows = steering or [m for m in (first, second) if "cfg_rows" in m.metadata]
    if with_rows and any("cfg_rows" in m.metadata for m in (first, second)):
        kept["cfg_rows"] = str(with_rows[0].metadata.get("cfg_rows", "cond"))
    return kept


def describe_buckets(buckets: Sequence[float] | None) -> str:
    """ "none (one map for every step)" or "25, noise levels 0.999 .. 0.039"."""
    if buckets is None:
        return "none (one map for every step)"
    return f"{len(buckets)}, noise levels {max(buckets):.3f} .. {min(buckets):.3f}"


def _compose_pair(first: ModuleMap, second: ModuleMap) -> ModuleMap:
    """Compose two affine maps on one module (see ``ACTMap.compose``)."""
    w1, b1 = first.omega.double(), first.beta.double()
    w2, b2 = second.omega.double(), second.beta.double()
    # Preimage of the second map's support (low2, high2) under x -> w1 x + b1.
    with torch.no_grad():
        safe_w1 = torch.where(w1 == 0, 1.0, w1)
        edge_a = (second.low.double() - b1) / safe_w1
        edge_b = (second.high.double() - b1) / safe_w1
        pre_low = torch.where(w1 > 0, edge_a, edge_b)
        pre_high = torch.where(w1 > 0, edge_b, edge_a)
        # w1 == 0: the image is the constant b1, inside or outside the second support for every x.
        inside = (second.low.double() < b1) & (b1 < second.high.double())
        pre_low = torch.where(w1 == 0, torch.where(inside, -math.inf, math.inf), pre_low)
        pre_high = torch.where(w1 == 0, torch.where(inside, math.inf, -math.inf), pre_high)
    low = torch.maximum(first.low.double(), pre_low)
    high = torch.minimum(first.high.double(), pre_high)
    high = torch.where(low > high, low, high)  # an empty support: low == high (the mask is strict)
    return replace(
        first,
        omega=(w2 * w1).float(),
        beta=(w2 * b1 + b2).float(),
        low=low.float(),
        high=high.float(),
    )


def part_of(name: str) -> str:
    """The model part a canonical module name belongs to: its first dotted component."""
    return name.split(".", 1)[0]


def prompt_digest(prompts: Sequence[str]) -> str:
    """A short stable digest of a prompt list, stored in metadata to tell which prompts fitted a map."""
    return hashlib.sha256("\n".join(prompts).encode("utf-8")).hexdigest()[:16]


def model_fingerprint(widths: Mapping[str, int | None]) -> str:
    """A digest of module names and widths: equal for models of the same architecture."""
    text = "\n".join(f"{name}:{width}" for name, width in widths.items())
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

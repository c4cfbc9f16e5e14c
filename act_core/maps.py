"""ACTMap: the fitted per-module transport maps plus the metadata needed to reuse them safely.

A map is a dict of ``ModuleMap`` (one per hooked module, in execution order) and a JSON-able metadata
dict. It saves to a single safetensors file (a format that cannot run code) with the metadata in the
header, and is written atomically so an interrupted save never leaves a half-written file.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import __version__
from .errors import ACTInputError, ACTMapFileError, ACTModelMismatchError

FILE_FORMAT = "act_map"
FILE_FORMAT_VERSION = "1"
APPLY_PER_ELEMENT = "per_element"
APPLY_SPATIAL_MEAN = "spatial_mean"
APPLY_MODES = (APPLY_PER_ELEMENT, APPLY_SPATIAL_MEAN)
_TENSOR_FIELDS = ("omega", "beta", "low", "high")


@dataclass
class ModuleMap:
    """The affine map ``T(x) = omega * x + beta`` of one module, applied where ``low < x < high``.

    ``apply_mode`` says how 4-D (B, C, H, W) outputs are transported: ``per_element`` maps every
    element; ``spatial_mean`` (the reference's choice for UNet feature maps) maps only the per-channel
    spatial mean and adds the resulting shift to every position. 2-D and 3-D outputs are always mapped
    per element along their last axis.
    """

    omega: torch.Tensor
    beta: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor
    apply_mode: str = APPLY_PER_ELEMENT

    def __post_init__(self) -> None:
        for name in _TENSOR_FIELDS:
            value = torch.as_tensor(getattr(self, name)).detach().to(device="cpu", dtype=torch.float32)
            setattr(self, name, value.flatten().contiguous())
        widths = {getattr(self, name).numel() for name in _TENSOR_FIELDS}
        if len(widths) != 1:
            raise ACTInputError(f"omega, beta, low and high must have the same length, got {sorted(widths)}.")
        if self.apply_mode not in APPLY_MODES:
            raise ACTInputError(f"apply_mode must be one of {APPLY_MODES}, got {self.apply_mode!r}.")
        if not (torch.isfinite(self.omega).all() and torch.isfinite(self.beta).all()):
            raise ACTInputError(
                "omega and beta must be finite; the activations they were fitted on were not."
            )

    @property
    def width(self) -> int:
        """Number of units (channels) the map acts on."""
        return self.omega.numel()

    @property
    def unbounded(self) -> bool:
        """True when the support mask is always on (needed for folding into weights)."""
        return bool(torch.isneginf(self.low).all() and torch.isposinf(self.high).all())

    @property
    def foldable(self) -> bool:
        """Affine on every element, so it can be written into the producing layer's weights."""
        return self.unbounded and self.apply_mode == APPLY_PER_ELEMENT

    def equal(self, other: ModuleMap) -> bool:
        """Exact equality of all tensors and the apply mode."""
        return self.apply_mode == other.apply_mode and all(
            torch.equal(getattr(self, name), getattr(other, name)) for name in _TENSOR_FIELDS
        )


@dataclass
class ACTMap:
    """Per-module transport maps (in execution order) and metadata (method, support, provenance)."""

    modules: dict[str, ModuleMap]
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.modules:
            raise ACTInputError("An ACT map needs at least one module map.")
        self.modules = dict(self.modules)
        try:
            # Round-trip through JSON so a map equals its saved-and-loaded copy (tuples become lists).
            self.metadata = json.loads(json.dumps(dict(self.metadata)))
        except (TypeError, ValueError) as error:
            raise ACTInputError(f"ACT map metadata must be JSON-serialisable: {error}") from None

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
        )

    def summary(self) -> str:
        """A short human-readable description (used by the CLI's ``info``)."""
        lines = [f"ACT map: {len(self)} modules, {sum(self.widths.values())} units"]
        for key in ("method", "support", "mode", "apply_mode", "num_source", "num_target", "preset", "model"):
            if key in self.metadata:
                lines.append(f"  {key}: {self.metadata[key]}")
        for part in self.parts():
            names = [name for name in self.modules if part_of(name) == part]
            lines.append(
                f"  part {part}: {len(names)} modules, foldable={self.restrict(parts=[part]).foldable}"
            )
        return "\n".join(lines)

    # ----------------------------------------------------------------------------------- algebra
    def restrict(
        self,
        names: Iterable[str] | None = None,
        patterns: Iterable[str] | None = None,
        parts: Iterable[str] | None = None,
    ) -> ACTMap:
        """A map with only the modules that match every given filter (exact names, globs, parts)."""
        names = None if names is None else set(names)
        patterns = None if patterns is None else list(patterns)
        parts = None if parts is None else set(parts)
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
        return ACTMap(kept, metadata)

    def compose(self, other: ACTMap) -> ACTMap:
        """The map that applies ``self`` first, then ``other`` (on modules both contain).

        For a module in both, the affine maps compose: ``omega = w2 * w1``, ``beta = w2 * b1 + b2``. The
        composed support is where the first map applies and its image lies in the second's support, so
        the result is exact wherever both maps are active (always, for unbounded supports); values in
        only one support are left unchanged rather than half-transported. Modules in only one map keep
        their map. The order follows ``self``, then modules new in ``other``.
        """
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
            "composed_of": [self.metadata, other.metadata],
            "act_version": __version__,
        }
        return ACTMap(composed, metadata)

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
        """Write the map as safetensors (tensors + JSON metadata in the header), atomically."""
        path = Path(path)
        if path.suffix != ".safetensors":
            raise ACTInputError(f"ACT maps are saved as .safetensors files; got {path.name!r}.")
        tensors = {
            f"{name}.{field_name}": getattr(module_map, field_name)
            for name, module_map in self.modules.items()
            for field_name in _TENSOR_FIELDS
        }
        header = {
            "format": FILE_FORMAT,
            "format_version": FILE_FORMAT_VERSION,
            "modules": json.dumps(
                [{"name": n, "width": m.width, "apply_mode": m.apply_mode} for n, m in self.modules.items()]
            ),
            "metadata": json.dumps(self.metadata),
        }
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ACTMap:
        """Read a map written by ``save``. Never unpickles anything; validates every tensor."""
        path = Path(path)
        if not path.is_file():
            raise ACTMapFileError(
                f"ACT map file not found: {str(path)!r}. Check the path (maps end in .safetensors)."
            )
        try:
            with safe_open(str(path), framework="pt") as handle:
                header = handle.metadata() or {}
                if header.get("format") != FILE_FORMAT:
                    raise ACTMapFileError(
                        f"{path.name} is a safetensors file but not an ACT map (no 'format: {FILE_FORMAT}' "
                        "header). Export LoRA files are not maps; load the map you saved with ACTMap.save."
                    )
                if header.get("format_version") != FILE_FORMAT_VERSION:
                    raise ACTMapFileError(
                        f"{path.name} uses ACT map format version {header.get('format_version')!r}; this "
                        f"library reads version {FILE_FORMAT_VERSION}. Upgrade comfyui-act or re-fit the map."
                    )
                entries = json.loads(header["modules"])
                metadata = json.loads(header.get("metadata", "{}"))
                keys = set(handle.keys())
                modules = {}
                for entry in entries:
                    name = entry["name"]
                    fields = {}
                    for field_name in _TENSOR_FIELDS:
                        key = f"{name}.{field_name}"
                        if key not in keys:
                            raise ACTMapFileError(
                                f"{path.name} is incomplete: tensor {key!r} is missing. Re-save the map."
                            )
                        fields[field_name] = handle.get_tensor(key)
                    if fields["omega"].numel() != entry["width"]:
                        raise ACTMapFileError(f"{path.name} is inconsistent: module {name!r} width mismatch.")
                    modules[name] = ModuleMap(**fields, apply_mode=entry["apply_mode"])
        except ACTMapFileError:
            raise
        except Exception as error:  # safetensors raises its own error types for truncated/corrupt headers
            raise ACTMapFileError(
                f"Cannot read ACT map {path.name}: the file is corrupted or truncated ({type(error).__name__}: "
                f"{error}). Re-save or re-fit the map."
            ) from None
        return cls(modules, metadata)


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
    return replace(
        first,
        omega=(w2 * w1).float(),
        beta=(w2 * b1 + b2).float(),
        low=torch.maximum(first.low.double(), pre_low).float(),
        high=torch.minimum(first.high.double(), pre_high).float(),
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


def atomic_write(path: str | os.PathLike, write: Any) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it into place.

    The rename is atomic on POSIX and Windows, so readers see the old file or the new one, never a
    partial one; on any error or interrupt (KeyboardInterrupt included) the temporary file is removed.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise ACTInputError(
            f"Cannot write {str(path)!r}: folder {str(path.parent)!r} does not exist. Create it first."
        )
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path

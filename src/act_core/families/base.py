"""What a model family is, as data: its parts, its presets, and how its modules are named elsewhere."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ..errors import ACTInputError
from ..presets import Preset


@dataclass(frozen=True)
class ModelFamily:
    """One architecture family (SDXL, FLUX, ...), described once for every host.

    ``parts`` are the canonical part names (the first component of every module name in a map);
    ``denoiser`` is the part the sampler calls at every step. ``noise_level`` says how a denoiser
    call's noise level ``u`` in [0, 1] is defined (the key of time-aware maps). ``lora_key`` maps a
    canonical module name to the key stem ComfyUI's stock LoraLoader reads.
    """

    name: str
    parts: tuple[str, ...]
    denoiser: str
    presets: Mapping[str, Preset]
    default_preset: str
    noise_level: str
    lora_key: Callable[[str], str]
    # ComfyUI's model_sampling.timestep(sigma) divided by this is the noise level u in [0, 1].
    comfy_timestep_scale: float = 1000.0

    def preset(self, name: str | Preset) -> Preset:
        """A preset of this family by name (or a ``Preset`` passed through, for custom module sets)."""
        if isinstance(name, Preset):
            unknown = [part for part in name.parts if part not in self.parts]
            if unknown:
                raise ACTInputError(
                    f"Preset {name.name!r} hooks part(s) {unknown}, which {self.name} models do not have "
                    f"(parts: {', '.join(self.parts)})."
                )
            return name
        try:
            return self.presets[name]
        except KeyError:
            raise ACTInputError(
                f"Unknown ACT preset {name!r} for {self.name}; choose one of {', '.join(self.presets)}."
            ) from None

    def split(self, name: str) -> tuple[str, str]:
        """``"unet.down_blocks.0..." -> ("unet", "down_blocks.0...")``, validating the part."""
        part, _, path = name.partition(".")
        if part not in self.parts or not path:
            raise ACTInputError(
                f"{name!r} is not a canonical ACT module name for {self.name}; it must start with one of "
                f"{self.parts}."
            )
        return part, path

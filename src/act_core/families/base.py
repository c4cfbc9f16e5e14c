"""What a model family is, as data: its parts, its presets, how each host finds its modules, and what its
maps can do. Everything the edges (diffusers, ComfyUI, the CLI) ask about a family is a field here, so no
code outside ``act_core.families`` asks "which family is this?"."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..errors import ACTInputError, ACTModelMismatchError
from ..memory import ActivationMemory
from ..presets import Preset

# A zero-argument callable giving ComfyUI's ``{diffusers parameter key: ComfyUI key}`` table of a MODEL
# (``comfy.utils.unet_to_diffusers(unet_config)``); families that name modules without it ignore it.
KeyTable = Callable[[], Mapping[str, str]]
ModuleFinder = Callable[..., Mapping[str, nn.Module]]


def no_dead_modules(part: str, num_layers: int, has_second_encoder: bool) -> tuple[str, ...]:
    """Families whose every text-encoder layer reaches the denoiser."""
    return ()


@dataclass(frozen=True)
class ModelFamily:
    """One architecture family (SDXL, FLUX, ...), described once for every host.

    ``parts`` are the canonical part names (the first component of every module name in a map);
    ``denoiser`` is the part the sampler calls at every step. ``noise_level`` says how a denoiser call's
    noise level ``u`` in [0, 1] is defined (the key of time-aware maps). ``lora_key`` maps a canonical
    module name, and its state-dict module prefix where known (``comfy_state_keys``), to the key stem of a
    LoRA file (or raises, saying why the family's maps do not fold).
    """

    name: str
    display_name: str
    parts: tuple[str, ...]
    denoiser: str
    presets: Mapping[str, Preset]
    default_preset: str
    noise_level: str
    lora_key: Callable[..., str]
    # The preset whose maps fold into weights (fuse_act, LoRA export), or None where no map folds.
    foldable_preset: str | None = None
    # Whether the family's sampler runs a CFG batch ([uncond; cond] rows); False where guidance is an
    # embedding (FLUX.1), so fitting calls have no uncond rows and maps steer every row.
    cfg_batch: bool = True
    # How the family's diffusers pipeline runs CFG: "batch" (one call on [uncond; cond] rows),
    # "batch_cond_first" (one call on [cond; uncond] rows: ZImagePipeline) or "separate" (two calls per step,
    # the prompt's first, then the negative prompt's), so hooks know which rows to steer.
    cfg_calls: str = "batch"
    # (default, maximum) of the T5 prompt length option ``max_sequence_length``; None: no such option.
    max_sequence_length: tuple[int, int] | None = None
    # (part, that encoder's layer count, whether a second text encoder exists) -> module-path globs whose
    # output never reaches the denoiser (never hooked).
    dead_modules: Callable[[str, int, bool], tuple[str, ...]] = no_dead_modules
    # diffusers: pipeline class names (``model_index.json``'s ``_class_name``), the denoiser's class names,
    # the module with the family's sampling adapter, and (part, component) -> canonical name -> module.
    diffusers_pipelines: tuple[str, ...] = ()
    diffusers_denoisers: tuple[str, ...] = ()
    diffusers_adapter: str | None = None
    diffusers_modules: ModuleFinder | None = None
    # ComfyUI: class names of ``MODEL.model.diffusion_model``; (diffusion_model, KeyTable) -> canonical
    # name -> module; ``CLIP.cond_stage_model`` -> canonical name -> module; (canonical names, KeyTable) ->
    # their state-dict module prefixes (for weight patches of foldable maps).
    comfy_denoisers: tuple[str, ...] = ()
    comfy_denoiser_modules: ModuleFinder | None = None
    comfy_clip_modules: ModuleFinder | None = None
    # text-encoder part -> the encoder's attribute on ComfyUI's ``CLIP.cond_stage_model`` (``clip_l``, ...)
    comfy_clip_parts: Mapping[str, str] = field(default_factory=dict)
    comfy_state_keys: Callable[[Iterable[str], KeyTable], dict[str, str]] | None = None
    # diffusers pipeline -> the table a KeyTable gives for the same denoiser in ComfyUI, built from the
    # pipeline's own config, so ``comfy_state_keys`` names a diffusers map's modules as the original checkpoint
    # (and so LoRA files) do. None where no map folds.
    diffusers_key_table: Callable[[Any], Mapping[str, str]] | None = None
    # Whether ComfyUI's Fit node may run different prompts in one call, their tokens tiled to a common length
    # as ComfyUI batches cross-attention conds. False where a prompt's token count is part of the model's
    # input (Lumina 2's NextDiT takes ``num_tokens``; ComfyUI 0.3.64's cannot mask a padded batch): each
    # prompt pair then runs on its own conditioning, as CLIPTextEncode makes it, in calls of its own, so the
    # fit runs "lagged".
    comfy_batched_prompts: bool = True
    # ComfyUI's model_sampling.timestep(sigma) divided by this is the noise level u in [0, 1]; None (a family
    # of several architectures, whose timestep units differ): divided by timestep(model_sampling.sigma_max).
    comfy_timestep_scale: float | None = 1000.0
    # The denoiser's measured activation memory per batch row (benchmarks/bench_memory.py): how many prompt pairs
    # one call can take (``act_core.memory.pairs_per_call``). None: unmeasured (``act_core.memory.UNMEASURED``).
    activation_memory: ActivationMemory | None = None

    @property
    def folds(self) -> bool:
        """Whether any of this family's maps fold into weights (and export as LoRA files)."""
        return self.foldable_preset is not None

    @property
    def hosts(self) -> tuple[str, ...]:
        """The hosts that fit and apply this family's maps."""
        return tuple(
            host
            for host, supported in (
                ("diffusers", self.diffusers_adapter is not None),
                ("comfyui", self.comfy_denoiser_modules is not None),
            )
            if supported
        )

    def check_host(self, host: str) -> None:
        """Refuse, with the hosts that do support it, a family this host does not know."""
        if host not in self.hosts:
            raise ACTModelMismatchError(
                f"{self.display_name} models are steered in {' and '.join(self.hosts) or 'no host'} only for now, "
                f"not in {host}: fit and apply this map there."
            )

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
        except (KeyError, TypeError):
            raise ACTInputError(
                f"Unknown ACT preset {name!r} for {self.name}; choose one of {', '.join(self.presets)}."
            ) from None

    def split(self, name: str) -> tuple[str, str]:
        """``"unet.down_blocks.0..." -> ("unet", "down_blocks.0...")``, validating the part."""
        part, _, path = name.partition(".")
        if part not in self.parts or not path:
            raise ACTInputError(
                f"{name!r} is not a canonical ACT module name for {self.name}; it must start with one "
                f"of {self.parts}."
            )
        return part, path

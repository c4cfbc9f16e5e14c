"""diffusers integration: ``pipe.fit_act(...)``, ``pipe.enable_act(...)``, ``pipe.fuse_act()`` and friends.

Use the ready classes or wrap an existing pipeline without reloading weights::

    from act_core.pipeline import act_pipeline
    pipe = act_pipeline(StableDiffusionXLPipeline.from_pretrained(path))   # shares the modules
    act_map = pipe.fit_act(["a cat"] * 8, ["a cat, watercolor"] * 8)
    pipe.enable_act(act_map, strength=1.0)
    image = pipe("a dog").images[0]

Hooks are plain ``torch`` forward hooks (public API, order-independent removal, work on transformers
modules too), not ``diffusers.hooks``: removing the last diffusers hook resets ``module.forward``, which
would silently drop an accelerate offload hook added after ACT. Hook state lives on the modules (as
FreeU and LoRA do), so pipelines made with ``from_pipe`` see and can disable the same ACT.

Under classifier-free guidance the UNet maps act on the cond half of the batch only: the maps are
fitted on the cond branch, and steering the uncond half too pushed images to black in a spike. Text
encoder maps act on every prompt they encode (negative prompts included), as in ComfyUI.
"""

from __future__ import annotations

import contextvars
import copy
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .applying import ACTHandle, Strength, active_fold, active_handle, apply_act, check_strength, fold_act
from .errors import ACTInputError
from .fitting import fit_with_stats
from .maps import ACTMap, prompt_digest
from .names import PARTS, TEXT_ENCODER, TEXT_ENCODER_2, UNET, component_modules, split_part
from .presets import DEFAULT_PRESET, dead_text_encoder_paths, get_preset
from .recording import token_mask_hooks

_ACTIVE_PIPELINE: contextvars.ContextVar[Any] = contextvars.ContextVar("act_active_pipeline", default=None)
_GATE_ATTR = "_act_step_gate"
_RESUME_ATTR = "_act_resume"
CFG_ROWS = ("cond", "all")


class _UNetStepGate:
    """A UNet forward pre-hook: switches UNet maps on inside [start, end] and picks the CFG rows.

    Denoising progress is read off the timestep, ``1 - t / num_train_timesteps`` (0 at pure noise), the
    same convention as ComfyUI's start/end percent, so no step counter has to be threaded through.
    """

    def __init__(self, handle: ACTHandle, start: float, end: float, cfg_rows: str, num_train_timesteps: int):
        self.handle, self.start, self.end = handle, start, end
        self.cfg_rows, self.num_train_timesteps = cfg_rows, num_train_timesteps
        self.removable = None

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs.get("sample")
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        if timestep is not None:
            t = float(torch.as_tensor(timestep).flatten()[0])
            progress = 1.0 - t / self.num_train_timesteps
            self.handle.set_enabled(self.start - 1e-6 <= progress <= self.end + 1e-6, [UNET])
        rows = None
        pipe = _ACTIVE_PIPELINE.get()
        if (
            self.cfg_rows == "cond"
            and pipe is not None
            and getattr(pipe, "do_classifier_free_guidance", False)
        ):
            batch = sample.shape[0]
            rows = slice(batch // 2, batch)  # diffusers orders a CFG batch as [uncond; cond]
        self.handle.set_rows(rows, [UNET])


class ACTPipelineMixin:
    """Adds ACT to a diffusers Stable Diffusion XL (or 1.5) pipeline."""

    # ------------------------------------------------------------------------------ model parts
    def _act_components(self) -> dict[str, nn.Module]:
        return {part: getattr(self, part) for part in PARTS if getattr(self, part, None) is not None}

    def act_modules(self, parts: Sequence[str] | None = None) -> dict[str, nn.Module]:
        """Every submodule of the given parts (default: all), keyed by canonical name."""
        components = self._act_components()
        parts = list(components) if parts is None else list(parts)
        missing = [part for part in parts if part not in components]
        if missing:
            raise ACTInputError(
                f"This pipeline has no {missing} (it has {list(components)}); the map was made for another "
                "kind of pipeline. Use act_map.restrict(parts=[...]) to keep the parts it has."
            )
        modules: dict[str, nn.Module] = {}
        for part in parts:
            modules.update(component_modules(part, components[part]))
        return modules

    def act_preset_modules(
        self, preset: str = DEFAULT_PRESET, parts: Sequence[str] | None = None
    ) -> dict[str, nn.Module]:
        """The modules a preset hooks (optionally only some of its parts), in registration order."""
        spec = get_preset(preset)
        parts = spec.parts if parts is None else tuple(parts)
        selected = {}
        for part in parts:
            if part not in spec.patterns:
                raise ACTInputError(f"Preset {preset!r} hooks {spec.parts}, not {part!r}.")
            excluded: tuple[str, ...] = ()
            if part == TEXT_ENCODER and getattr(self, TEXT_ENCODER_2, None) is not None:
                excluded = dead_text_encoder_paths(part, self.text_encoder.config.num_hidden_layers)
            selected.update(spec.select(part, self.act_modules([part]), excluded))
        if not selected:
            raise ACTInputError(f"Preset {preset!r} matched no module of this pipeline's {parts}.")
        return selected

    # ------------------------------------------------------------------------------ fitting
    def fit_act(
        self,
        source_prompts: Sequence[str],
        target_prompts: Sequence[str],
        *,
        preset: str = DEFAULT_PRESET,
        parts: Sequence[str] | None = None,
        method: str | None = None,
        support: str | None = None,
        mode: str | None = None,
        batch_size: int = 8,
        seed: int = 0,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 30,
        statistics_steps: int = 1,
        causal_strategy: str = "auto",
        max_lockstep_batches: int = 64,
        progress: bool | Callable[[int, int, str], None] = True,
    ) -> ACTMap:
        """Fit a map that moves generations for ``source_prompts`` toward ``target_prompts``.

        Statistics come from the cond branch (no CFG) at the first ``statistics_steps`` denoising steps
        of a ``num_inference_steps`` schedule (first step only by default, as in the paper); prompt i of
        either side gets the noise of seed ``seed + i``. Text-encoder-only presets run no UNet at all.
        ``progress`` shows a tqdm bar (True), nothing (False), or calls your ``progress(done, total, what)``.
        ``mode`` ("causal" or "at_once") defaults to the preset's own (causal, except ``text_encoder_and_unet_norms``).
        """
        source_prompts, target_prompts = (
            _check_prompts(source_prompts, "source"),
            _check_prompts(target_prompts, "target"),
        )
        if batch_size < 1 or statistics_steps < 1 or num_inference_steps < statistics_steps:
            raise ACTInputError(
                "batch_size and statistics_steps must be >= 1, and num_inference_steps >= statistics_steps."
            )
        spec = get_preset(preset)
        mode = mode or spec.mode
        modules = self.act_preset_modules(preset, parts)
        use_unet = any(split_part(name)[0] == UNET for name in modules)
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor

        def batches(prompts: list[str]) -> list[tuple[int, dict[str, torch.Tensor]]]:
            # Tokenize here, in the calling thread: tokenizers are not thread-safe, and lockstep
            # fitting runs the batches concurrently.
            return [
                (start, self._act_tokenize(prompts[start : start + batch_size]))
                for start in range(0, len(prompts), batch_size)
            ]

        def run_model(batch: tuple[int, dict[str, torch.Tensor]]) -> None:
            first_index, tokens = batch
            embeds, added = self._act_encode(tokens, height, width)
            if use_unet:
                self._act_denoise(
                    embeds, added, first_index, seed, height, width, num_inference_steps, statistics_steps
                )

        with _text_encoder_token_masks(self):
            act_map, _ = fit_with_stats(
                run_model,
                batches(source_prompts),
                batches(target_prompts),
                modules,
                method=method or spec.method,
                support=support or spec.support,
                mode=mode,
                apply_mode=spec.apply_mode,
                causal_strategy="groupwise" if statistics_steps > 1 and mode == "causal" else causal_strategy,
                max_lockstep_batches=max_lockstep_batches,
                progress=_progress_callback(progress, "Fitting ACT map"),
                metadata={
                    "preset": preset,
                    "model": type(self).__name__.removeprefix("ACT"),
                    "num_source_prompts": len(source_prompts),
                    "num_target_prompts": len(target_prompts),
                    "source_digest": prompt_digest(source_prompts),
                    "target_digest": prompt_digest(target_prompts),
                    "seed": seed,
                    "statistics": {
                        "height": height,
                        "width": width,
                        "num_inference_steps": num_inference_steps,
                        "statistics_steps": statistics_steps if use_unet else 0,
                        "guidance": "off (cond branch)",
                    },
                },
            )
        return act_map

    def _act_tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Token ids for each text encoder, padded to the tokenizer's max length as the pipeline does."""
        tokens = {}
        for part, tokenizer_name in ((TEXT_ENCODER, "tokenizer"), (TEXT_ENCODER_2, "tokenizer_2")):
            tokenizer = getattr(self, tokenizer_name, None)
            if getattr(self, part, None) is not None and tokenizer is not None:
                tokens[part] = tokenizer(
                    prompts,
                    padding="max_length",
                    max_length=tokenizer.model_max_length,
                    truncation=True,
                    return_tensors="pt",
                ).input_ids
        return tokens

    def _act_encode(
        self, tokens: dict[str, torch.Tensor], height: int, width: int
    ) -> tuple[torch.Tensor, dict | None]:
        """Cond-branch prompt embeddings (and SDXL's added conditioning), as the pipeline computes them.

        SDXL: penultimate hidden states of both encoders, concatenated; pooled output of encoder 2.
        SD 1.5: the last hidden state of its one encoder.
        """
        device = self._execution_device
        if getattr(self, TEXT_ENCODER_2, None) is None:
            return self.text_encoder(tokens[TEXT_ENCODER].to(device))[0], None
        hidden, pooled = [], None
        for part, ids in tokens.items():
            output = getattr(self, part)(ids.to(device), output_hidden_states=True)
            if output[0].ndim == 2:
                pooled = output[0]
            hidden.append(output.hidden_states[-2])
        embeds = torch.cat(hidden, dim=-1)
        time_ids = self._get_add_time_ids(
            (height, width),
            (0, 0),
            (height, width),
            dtype=embeds.dtype,
            text_encoder_projection_dim=self.text_encoder_2.config.projection_dim,
        )
        return embeds, {"text_embeds": pooled, "time_ids": time_ids.to(device).repeat(embeds.shape[0], 1)}

    def _act_denoise(
        self,
        embeds: torch.Tensor,
        added: dict | None,
        first_index: int,
        seed: int,
        height: int,
        width: int,
        num_inference_steps: int,
        statistics_steps: int,
    ) -> None:
        """Run the first denoising steps on seeded noise (a private scheduler copy: thread-safe)."""
        device, dtype = self._execution_device, self.unet.dtype
        shape = (
            self.unet.config.in_channels,
            height // self.vae_scale_factor,
            width // self.vae_scale_factor,
        )
        noise = torch.stack(
            [
                torch.randn(shape, generator=torch.Generator().manual_seed(seed + first_index + i))
                for i in range(len(embeds))
            ]
        )
        scheduler = copy.deepcopy(self.scheduler)
        scheduler.set_timesteps(num_inference_steps, device=device)
        latents = (noise * scheduler.init_noise_sigma).to(device=device, dtype=dtype)
        for step, t in enumerate(scheduler.timesteps[:statistics_steps]):
            model_input = scheduler.scale_model_input(latents, t)
            kwargs = {"added_cond_kwargs": added} if added is not None else {}
            noise_pred = self.unet(model_input, t, encoder_hidden_states=embeds, return_dict=False, **kwargs)[
                0
            ]
            if step + 1 < statistics_steps:
                latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]

    # ------------------------------------------------------------------------------ applying
    @property
    def act_map(self) -> ACTMap | None:
        """The map currently hooked or fused into this pipeline's modules, if any."""
        modules = self.act_modules()
        handle = active_handle(modules)
        if handle is not None:
            return handle.act_map
        fold = active_fold(modules)
        return fold.act_map if fold is not None else None

    def enable_act(
        self,
        act_map: ACTMap | str | os.PathLike,
        strength: Strength = 1.0,
        *,
        start: float = 0.0,
        end: float = 1.0,
        cfg_rows: str = "cond",
    ) -> ACTHandle:
        """Hook a map (or a ``.safetensors`` map file) into the pipeline; replaces any enabled map.

        ``strength`` is lambda: a number, or per part (``{"unet": 1.0, "text_encoder": 0.5}``).
        ``start``/``end`` bound the fraction of denoising during which UNet maps act (0 = first step).
        ``cfg_rows``: "cond" (default) steers only the cond half of a CFG batch, "all" steers both.
        """
        if not isinstance(act_map, ACTMap):
            act_map = ACTMap.load(act_map)
        start, end = check_strength(start, "start"), check_strength(end, "end")
        if not 0.0 <= start <= end <= 1.0:
            raise ACTInputError(
                f"Need 0 <= start <= end <= 1 (fractions of denoising), got start={start}, end={end}."
            )
        if cfg_rows not in CFG_ROWS:
            raise ACTInputError(f"cfg_rows must be one of {CFG_ROWS}, got {cfg_rows!r}.")
        if active_fold(self.act_modules()) is not None:
            raise ACTInputError(
                "An ACT map is fused into the weights; call unfuse_act() before enabling a map."
            )
        self.disable_act()
        handle = apply_act(self.act_modules(act_map.parts()), act_map, strength)
        if UNET in act_map.parts():
            gate = _UNetStepGate(handle, start, end, cfg_rows, self.scheduler.config.num_train_timesteps)
            gate.removable = self.unet.register_forward_pre_hook(gate, with_kwargs=True)
            setattr(self.unet, _GATE_ATTR, gate)
        return handle

    def set_act_strength(self, strength: Strength) -> None:
        """Change lambda of the enabled map without re-hooking (a number or per part)."""
        handle = active_handle(self.act_modules())
        if handle is None:
            raise ACTInputError("No ACT map is enabled; call enable_act(map) first.")
        handle.set_strength(strength)

    def disable_act(self) -> None:
        """Remove any enabled map's hooks; outputs are exactly the plain pipeline's again."""
        modules = self.act_modules()
        while (handle := active_handle(modules)) is not None:
            handle.remove()
        gate = getattr(self.unet, _GATE_ATTR, None) if getattr(self, UNET, None) is not None else None
        if gate is not None:
            gate.removable.remove()
            delattr(self.unet, _GATE_ATTR)

    def fuse_act(self, act_map: ACTMap | None = None, strength: Strength | None = None) -> None:
        """Fold a foldable map into the weights (zero cost per step); ``unfuse_act`` restores them.

        Without arguments it fuses the enabled map at its current strengths (its hooks are removed and
        come back on ``unfuse_act``). Only maps from the ``unet_norms_foldable`` preset (unbounded,
        per-element) can be fused. A step window (start/end) cannot be fused: weights act at every step.
        """
        modules = self.act_modules()
        handle = active_handle(modules)
        resume = None
        if handle is not None:
            gate = getattr(self.unet, _GATE_ATTR, None)
            resume = (handle.act_map, {p: c.strength for p, c in handle.controls.items()}, gate)
            if act_map is None:
                act_map = handle.act_map
                strength = resume[1] if strength is None else strength
        if act_map is None:
            raise ACTInputError("No map to fuse: pass one, or enable_act(map) first.")
        if gate_window(resume) and act_map is resume[0]:
            raise ACTInputError(
                "This map is enabled with a start/end window, which weights cannot follow; use hooks."
            )
        self.disable_act()
        fold = fold_act(self.act_modules(act_map.parts()), act_map, 1.0 if strength is None else strength)
        setattr(fold, _RESUME_ATTR, resume)

    def unfuse_act(self) -> None:
        """Restore the weights bit for bit; re-enables the hooks that ``fuse_act`` replaced."""
        fold = active_fold(self.act_modules())
        if fold is None:
            return
        fold.unfold()
        resume = getattr(fold, _RESUME_ATTR, None)
        if resume is not None:
            act_map, strengths, gate = resume
            options = {"start": gate.start, "end": gate.end, "cfg_rows": gate.cfg_rows} if gate else {}
            self.enable_act(act_map, strengths, **options)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # Lets the UNet gate ask this pipeline whether the batch is a CFG batch.
        token = _ACTIVE_PIPELINE.set(self)
        try:
            return super().__call__(*args, **kwargs)
        finally:
            _ACTIVE_PIPELINE.reset(token)


def gate_window(resume: tuple | None) -> bool:
    """True when an enabled map had a non-trivial step window."""
    gate = resume[2] if resume else None
    return gate is not None and (gate.start > 0.0 or gate.end < 1.0)


def _check_prompts(prompts: Sequence[str], side: str) -> list[str]:
    if isinstance(prompts, str):
        raise ACTInputError(f"{side}_prompts must be a list of prompts, not one string.")
    prompts = [p.strip() for p in prompts if isinstance(p, str) and p.strip()]
    if len(prompts) < 2:
        raise ACTInputError(
            f"The {side} prompt list has {len(prompts)} non-empty prompt(s); ACT needs at least 2 per side "
            "(the paper uses 1024). Add more prompts."
        )
    return prompts


def _progress_callback(progress: bool | Callable[[int, int, str], None], description: str):
    if callable(progress):
        return progress
    if not progress:
        return None
    from tqdm.auto import tqdm

    bar = None

    def update(done: int, total: int, what: str) -> None:
        nonlocal bar
        if bar is None or bar.total != total:
            if bar is not None:
                bar.close()
            bar = tqdm(total=total, desc=description)
        bar.n = done
        bar.set_postfix_str(what[-40:], refresh=False)
        bar.refresh()
        if done >= total:
            bar.close()

    return update


class _text_encoder_token_masks:  # noqa: N801 - used as a context manager, like torch.no_grad
    """While fitting, pool text encoder outputs over real tokens (BOS..first EOS), not padding.

    A pre-hook on each text encoder derives the mask from its input ids and sets it for the duration
    of that encoder's forward (per thread: lockstep fitting runs batches concurrently).
    """

    def __init__(self, pipe: Any):
        self.pairs = [
            (getattr(pipe, part), getattr(getattr(pipe, tokenizer, None), "eos_token_id", None))
            for part, tokenizer in ((TEXT_ENCODER, "tokenizer"), (TEXT_ENCODER_2, "tokenizer_2"))
            if getattr(pipe, part, None) is not None
        ]
        self.handles: list = []

    @staticmethod
    def _mask(eos: int, args: tuple, kwargs: dict) -> torch.Tensor | None:
        ids = args[0] if args else kwargs.get("input_ids")
        if not isinstance(ids, torch.Tensor):
            return None
        is_eos = (ids == eos).int()
        return (is_eos.cumsum(dim=1) - is_eos) == 0  # up to and including the first EOS

    def __enter__(self) -> _text_encoder_token_masks:
        for encoder, eos in self.pairs:
            if eos is not None:
                self.handles += token_mask_hooks(
                    encoder, lambda args, kwargs, eos=eos: self._mask(eos, args, kwargs)
                )
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def act_pipeline(pipe: Any) -> Any:
    """An ACT-enabled pipeline sharing ``pipe``'s modules (no weights reloaded, dtype kept).

    Built with diffusers' ``from_pipe`` on a subclass that adds ``ACTPipelineMixin`` to ``pipe``'s class.
    """
    cls = type(pipe)
    if isinstance(pipe, ACTPipelineMixin):
        return pipe
    act_cls = type(f"ACT{cls.__name__}", (ACTPipelineMixin, cls), {"__module__": __name__})
    # from_pipe casts every model to ``dtype``, here a no-op; diffusers' modeling_utils then warns about
    # fp32 modules on every such cast, even when there are none ("...kept in float32: []"), so mute it.
    modeling_logger = logging.getLogger("diffusers.models.modeling_utils")
    level = modeling_logger.level
    modeling_logger.setLevel(logging.ERROR)
    try:
        wrapped = act_cls.from_pipe(pipe, dtype=pipe.dtype)
    finally:
        modeling_logger.setLevel(level)
    if hasattr(pipe, "_progress_bar_config"):  # from_pipe does not carry it over
        wrapped.set_progress_bar_config(**pipe._progress_bar_config)
    return wrapped

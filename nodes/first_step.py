"""The paper's first-step protocol and the text-encoder presets on a ComfyUI MODEL / CLIP: the
first-step engine (``act_core.fitting``) replaying the denoiser's captured first-step inputs, or running the
CLIP's encoders, per batch of prompts. (The default presets fit along the trajectory: ``nodes/fitting.py``.)"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from act_core.errors import ACTError
from act_core.fitting import fit_with_stats
from act_core.maps import ACTMap, part_of
from act_core.memory import SAFETY_FRACTION, activation_bytes, denoiser_width, latent_pixels
from act_core.recording import token_mask_hooks
from act_core.workflow import FirstStepFit

from .conditioning import encode_prompts, prompt_noise, stack_conds

log = logging.getLogger("ComfyUI-ACT")
FIRST_STEP_SCHEDULER = "normal"  # first-step protocol: only sigma_max matters
FIRST_STEP_SAMPLER = "euler"


class _Captured(Exception):
    """Raised from a pre-hook on the UNet to stop ComfyUI's sampler once the UNet inputs are known."""

    def __init__(self, args: tuple, kwargs: dict):
        super().__init__("captured denoiser inputs")
        self.args, self.kwargs = args, kwargs


def capture_denoiser_inputs(
    model: Any, conditioning: list, noise: torch.Tensor, latent: torch.Tensor, steps: int, seed: int
) -> tuple[tuple, dict]:
    """The arguments ComfyUI passes to the UNet at the first step (cfg 1: cond branch only)."""
    import comfy.sample

    diffusion_model = model.model.diffusion_model

    def hook(module, args, kwargs):
        raise _Captured(args, kwargs)

    handle = diffusion_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        comfy.sample.sample(
            model,
            noise,
            steps,
            1.0,
            FIRST_STEP_SAMPLER,
            FIRST_STEP_SCHEDULER,
            conditioning,
            conditioning,
            latent,
            denoise=1.0,
            last_step=1,
            disable_pbar=True,
            seed=seed,
        )
    except _Captured as captured:
        kwargs = dict(captured.kwargs)
        options = kwargs.get("transformer_options")
        if isinstance(options, dict):
            if any(c != 0 for c in options.get("cond_or_uncond") or [0]):
                raise ACTError(
                    "This MODEL runs the negative (uncond) branch even at cfg 1 (disable_cfg1_optimization is set "
                    "by a node before Fit ACT map); fit on the model without that option."
                ) from None
            kwargs["transformer_options"] = dict(options)
        return captured.args, kwargs
    finally:
        handle.remove()
    raise ACTError("ComfyUI's sampler never called the UNet; cannot collect ACT statistics for this model.")


def denoiser_batches(
    model: Any,
    clip: Any,
    prompts: Sequence[str],
    *,
    seed: int,
    width: int,
    height: int,
    steps: int,
    batch_size: int,
    check: Callable[[], None],
) -> list[tuple[tuple, dict]]:
    """Captured UNet inputs per batch of prompts; prompt i gets the noise of seed ``seed + i``."""
    import comfy.sample

    encoded = encode_prompts(clip, prompts, check)
    batches = []
    for start in range(0, len(prompts), batch_size):
        check()
        chunk = encoded[start : start + batch_size]
        latent = torch.zeros((len(chunk), 4, height // 8, width // 8), dtype=torch.float32)
        latent = comfy.sample.fix_empty_latent_channels(model, latent)
        noise = prompt_noise(latent, seed + start, len(chunk))
        batches.append(capture_denoiser_inputs(model, stack_conds(chunk), noise, latent, steps, seed + start))
    return batches


def lockstep_ok(model: Any, family: Any, num_samples: int, width: int, height: int) -> tuple[bool, str]:
    """Whether concurrent UNet forwards are safe and fit in memory here (see the module docstring)."""
    import comfy.model_management as mm

    if getattr(model.model, "model_lowvram", False):
        return False, "the UNet is only partially loaded (low VRAM), so its weights are cast per forward"
    if getattr(mm, "NUM_STREAMS", 1) > 1:
        return False, "ComfyUI's async weight offload streams are shared between threads"
    itemsize = torch.empty((), dtype=model.model_dtype()).element_size()
    # the family's measured peak per row for every sample at once: an upper bound of the rendezvous' memory
    denoiser = model.model.diffusion_model
    need = activation_bytes(
        family, latent_pixels(height, width), itemsize, num_samples, denoiser_width(denoiser)
    )
    free = mm.get_free_memory(model.load_device)
    if need > SAFETY_FRACTION * free:
        return (
            False,
            f"all {num_samples} forwards at once would need ~{need / 2**30:.1f} GiB (free: {free / 2**30:.1f})",
        )
    return True, ""


# ------------------------------------------------------------------------------------------ text encoders
def text_batches(clip: Any, prompts: Sequence[str], batch_size: int) -> list[dict]:
    """Token batches for ``encode_token_weights``: the first 77-token chunk of each prompt, weights 1.

    Prompt weights only rescale the encoder OUTPUT (after the forward), so they do not change the
    activations ACT records; dropping them avoids the extra empty-prompt row ComfyUI adds for them.
    Tokenizers that do not pad (T5 alone, as ComfyUI's Chroma CLIP) give prompts of different lengths: a
    batch holds prompts of one length (padding would change the unmasked encoder's activations).
    """
    tokenized = [clip.tokenize(prompt) for prompt in prompts]
    batches = []
    for start in range(0, len(prompts), batch_size):
        chunk = tokenized[start : start + batch_size]
        groups: dict[tuple, list] = {}
        for tokens in chunk:
            groups.setdefault(tuple(len(tokens[key][0]) for key in chunk[0]), []).append(tokens)
        for group in groups.values():
            batches.append(
                {key: [[(t[0], 1.0) for t in tokens[key][0]] for tokens in group] for key in group[0]}
            )
    return batches


class _TokenMasks:
    """While fitting, pool text-encoder outputs over real tokens (start .. first end token), not padding."""

    def __init__(self, clip: Any):
        self.encoders = [
            getattr(clip.cond_stage_model, name)
            for name in ("clip_l", "clip_g")
            if getattr(clip.cond_stage_model, name, None) is not None
        ]
        self.handles: list = []

    @staticmethod
    def _mask(encoder: Any, args: tuple) -> torch.Tensor | None:
        tokens = args[0] if args else None
        end = getattr(encoder, "special_tokens", {}).get("end")
        if not (
            isinstance(tokens, list)
            and end is not None
            and all(isinstance(row, list) and all(isinstance(t, int) for t in row) for row in tokens)
        ):
            return None
        rows = []
        for row in tokens:
            stop = row.index(end) + 1 if end in row else len(row)
            rows.append([i < stop for i in range(len(row))])
        if len({len(r) for r in rows}) != 1:
            return None
        return torch.tensor(rows, dtype=torch.bool)

    def __enter__(self) -> _TokenMasks:
        for encoder in self.encoders:
            self.handles += token_mask_hooks(encoder, lambda args, kwargs, enc=encoder: self._mask(enc, args))
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def fit_first_step(host: Any, fit: FirstStepFit) -> tuple[ACTMap, Any]:
    """The first-step engine on this MODEL's denoiser (captured inputs replayed) or this CLIP's encoders."""
    import comfy.model_management as mm

    model, clip, settings, family = host.model, host.clip, host.settings, host.family
    uses_denoiser = any(part_of(name) == family.denoiser for name in fit.modules)
    strategy = fit.causal_strategy
    inference = host.inference
    if uses_denoiser:
        kwargs = {
            "seed": fit.seed,
            "width": settings.width,
            "height": settings.height,
            "steps": settings.num_inference_steps,
            "batch_size": fit.batch_size,
        }
        source_batches = denoiser_batches(model, clip, fit.source, check=host.check, **kwargs)
        target_batches = denoiser_batches(model, clip, fit.target, check=host.check, **kwargs)
        mm.load_models_gpu([model])
        diffusion_model = model.model.diffusion_model
        if fit.mode == "causal" and fit.causal_strategy == "auto":
            ok, why = lockstep_ok(
                model, family, len(fit.source) + len(fit.target), settings.width, settings.height
            )
            if not ok:
                log.info("ACT fit: group-wise causal fitting because %s.", why)
                strategy = "groupwise"

        def run_model(batch: tuple[tuple, dict]) -> None:
            args, kw = batch
            kw = dict(kw)
            if isinstance(kw.get("transformer_options"), dict):
                kw["transformer_options"] = dict(kw["transformer_options"])
            with torch.inference_mode(inference):
                diffusion_model(*args, **kw)

        masks = contextlib.nullcontext()
    else:
        source_batches = text_batches(clip, fit.source, fit.batch_size)
        target_batches = text_batches(clip, fit.target, fit.batch_size)
        encoder = clip.cond_stage_model
        encoder.reset_clip_options()
        if getattr(clip, "layer_idx", None) is not None:
            encoder.set_clip_options({"layer": clip.layer_idx})
        clip.load_model()

        def run_model(batch: dict) -> None:
            with torch.inference_mode(inference):
                encoder.encode_token_weights(batch)

        masks = _TokenMasks(clip)

    def report(done: int, total: int, what: str) -> None:
        host.check()
        if fit.progress is not None:
            fit.progress(done, total, what)

    with masks:
        return fit_with_stats(
            run_model,
            source_batches,
            target_batches,
            dict(fit.modules),
            mode=fit.mode,
            causal_strategy=strategy,
            progress=report,
            **fit.estimator_options,
        )

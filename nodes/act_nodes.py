"""The ACT nodes on ComfyUI's V3 API (``comfy_api.latest``): schemas that read like forms, work in the
modules beside this one. Imported only inside ComfyUI (``nodes.comfy_entrypoint``)."""

from __future__ import annotations

import os

from comfy_api.latest import ComfyExtension, io
from typing_extensions import override

from act_core.errors import ACTInputError
from act_core.maps import ACTMap

from .common import (
    ACT_MAP,
    CATEGORY,
    CAUSAL_STRATEGIES,
    COMFY_FAMILIES,
    DEFAULT_PRESET,
    DEFAULT_SOURCE_PROMPTS,
    DEFAULT_TARGET_PROMPTS,
    FALLBACK_SAMPLERS,
    FALLBACK_SCHEDULERS,
    LORA_DTYPES,
    MAX_SEED,
    METHODS,
    MODES,
    PRESET_NAMES,
    STRENGTH_RANGE,
    SUPPORTS,
)
from .folders import FOLDER, list_maps, map_path, write_into_folder

ActMap = io.Custom(ACT_MAP)
_PRESET_HELP = " ".join(
    f"{family.name.upper()} presets: "
    + "; ".join(f"{name}: {preset.description}" for name, preset in family.presets.items())
    + "."
    for family in COMFY_FAMILIES
)


def _sampler_choices() -> tuple[list[str], list[str]]:
    try:
        import comfy.samplers

        return list(comfy.samplers.KSampler.SAMPLERS), list(comfy.samplers.KSampler.SCHEDULERS)
    except Exception:  # ComfyUI without its sampler module: the common names
        return list(FALLBACK_SAMPLERS), list(FALLBACK_SCHEDULERS)


def _map_input() -> io.Input:
    return ActMap.Input("act_map", tooltip="An ACT map, from 'Fit ACT map' or 'Load ACT map'.")


def _checked_map(act_map: object) -> ACTMap:
    if not isinstance(act_map, ACTMap):
        raise ACTInputError("act_map must be an ACT map (from 'Fit ACT map' or 'Load ACT map').")
    return act_map


def _strength_input(name: str, tooltip: str, optional: bool = False) -> io.Input:
    return io.Float.Input(
        name, display_mode=io.NumberDisplay.slider, optional=optional, tooltip=tooltip, **STRENGTH_RANGE
    )


def _window_inputs() -> list[io.Input]:
    return [
        io.Float.Input(
            "start_percent",
            default=0.0,
            min=0.0,
            max=1.0,
            step=0.01,
            optional=True,
            tooltip="Fraction of denoising at which UNet transport starts (0 = first step). A window other than "
            "0..1 needs hooks, so foldable maps are then applied with hooks too.",
        ),
        io.Float.Input(
            "end_percent",
            default=1.0,
            min=0.0,
            max=1.0,
            step=0.01,
            optional=True,
            tooltip="Fraction of denoising at which UNet transport stops (1 = last step). Text-encoder maps act on "
            "the prompt encoding and ignore the window.",
        ),
    ]


def _sampling_inputs(optional: bool) -> list[io.Input]:
    samplers, schedulers = _sampler_choices()
    return [
        io.Float.Input(
            "cfg",
            default=7.0,
            min=0.0,
            max=100.0,
            step=0.1,
            round=0.01,
            optional=optional,
            tooltip="Classifier-free guidance scale. For fitting: the cfg you will sample with (the trajectory "
            "protocol fits along it).",
        ),
        io.Combo.Input(
            "sampler_name",
            options=samplers,
            default="euler",
            optional=optional,
            tooltip="The sampling algorithm (for fitting: the one you will sample with).",
        ),
        io.Combo.Input(
            "scheduler",
            options=schedulers,
            default="normal",
            optional=optional,
            tooltip="The noise schedule (for fitting: the one you will sample with).",
        ),
    ]


class ACTFitMap(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ACTFitMap",
            display_name="Fit ACT map",
            category=CATEGORY,
            description=(
                "Fit an Activation Transport (ACT) map that moves generations for the source prompts toward the "
                "target prompts (Rodriguez et al., ICLR 2025). With the default preset the prompt pairs are "
                "sampled with YOUR sampler settings (steps, cfg, sampler, scheduler, size), and one map per noise "
                "level is fitted along that trajectory, so it steers the sampler you use. Use many varied prompt "
                "pairs (dozens to hundreds). Interrupting stops the fit and leaves the model as it was."
            ),
            inputs=[
                io.Model.Input(
                    "model",
                    tooltip="The diffusion model to fit the map on: an SD 1.x / SDXL UNet, or FLUX.1 (preset default "
                    "picks the family's own; cfg 1 for FLUX).",
                ),
                io.Clip.Input(
                    "clip",
                    tooltip="The text encoders that encode the prompts (and are fitted by text-encoder presets).",
                ),
                io.String.Input(
                    "source_prompts",
                    multiline=True,
                    default=DEFAULT_SOURCE_PROMPTS,
                    tooltip="Prompts WITHOUT the property (p in the paper), one per line; blank lines are ignored.",
                ),
                io.String.Input(
                    "target_prompts",
                    multiline=True,
                    default=DEFAULT_TARGET_PROMPTS,
                    tooltip="Prompts WITH the property to transport toward (q), one per line; ideally the same "
                    "prompts as the source with the style added (line i pairs with source line i).",
                ),
                io.Combo.Input(
                    "preset",
                    options=PRESET_NAMES,
                    default=DEFAULT_PRESET,
                    tooltip="Which modules are hooked and how: default = the MODEL family's default "
                    f"({', '.join(f'{f.display_name} {f.default_preset}' for f in COMFY_FAMILIES)}); others must "
                    "belong to the MODEL's "
                    "family. " + _PRESET_HELP,
                ),
                io.String.Input(
                    "parts",
                    default="",
                    tooltip="Optional comma-separated subset of the preset's parts (unet, text_encoder, "
                    "text_encoder_2); empty = all.",
                ),
                io.Combo.Input(
                    "method",
                    options=METHODS,
                    default="linear",
                    tooltip="linear: Linear-AcT (the paper's best); mean: shift only; gaussian: Gaussian OT.",
                ),
                io.Combo.Input(
                    "support",
                    options=SUPPORTS,
                    default="auto",
                    tooltip="Where the map acts. auto: the preset's choice; range: source [min, max]; unbounded: "
                    "everywhere (needed for LoRA export); qLO-HI: an inner quantile range of the source.",
                ),
                io.Combo.Input(
                    "mode",
                    options=MODES,
                    default="preset",
                    tooltip="preset: the preset's own mode; causal: each layer fitted with the earlier layers' "
                    "maps applied (the paper's default); at_once: all layers from the plain model.",
                ),
                io.Int.Input(
                    "fit_seed",
                    default=0,
                    min=0,
                    max=MAX_SEED,
                    tooltip="Noise seed of the fit; prompt pair i uses seed + i.",
                ),
                io.Int.Input(
                    "width", default=1024, min=64, max=8192, step=8, tooltip="Image width you sample at."
                ),
                io.Int.Input(
                    "height", default=1024, min=64, max=8192, step=8, tooltip="Image height you sample at."
                ),
                io.Int.Input(
                    "steps",
                    default=20,
                    min=1,
                    max=1000,
                    tooltip="The steps you sample with (the trajectory protocol fits along all of them; the "
                    "first-step preset uses only the first).",
                ),
                io.Int.Input(
                    "batch_size",
                    default=4,
                    min=1,
                    max=256,
                    tooltip="First-step presets: prompts per model call. The trajectory protocol samples all pairs "
                    "as one batch (ComfyUI splits it if memory is short).",
                ),
                io.Combo.Input(
                    "causal_strategy",
                    options=CAUSAL_STRATEGIES,
                    default="auto",
                    optional=True,
                    tooltip="First-step presets: lockstep (one pass, all batches at once in threads), groupwise "
                    "(one shorter pass per group of layers), auto (lockstep when it fits in memory).",
                ),
                *_sampling_inputs(optional=True),
                io.String.Input(
                    "negative_prompt",
                    multiline=True,
                    default="",
                    optional=True,
                    tooltip="The negative prompt you will sample with (the uncond branch of the fitting trajectory).",
                ),
            ],
            outputs=[
                ActMap.Output(
                    "act_map",
                    display_name="act_map",
                    tooltip="The fitted ACT map (canonical diffusers module names: portable between ComfyUI and "
                    "diffusers).",
                ),
                io.String.Output(
                    "summary", display_name="summary", tooltip="A short text description of the map."
                ),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(
        cls,
        model,
        clip,
        source_prompts,
        target_prompts,
        preset,
        parts,
        method,
        support,
        mode,
        fit_seed,
        width,
        height,
        steps,
        batch_size,
        causal_strategy="auto",
        cfg=7.0,
        sampler_name="euler",
        scheduler="normal",
        negative_prompt="",
    ) -> io.NodeOutput:
        import comfy.utils

        from .fitting import fit_map

        # node_id given explicitly: first-step fitting reports progress from worker threads, which do not see
        # ComfyUI's executing-node context variable
        bar = comfy.utils.ProgressBar(1, node_id=cls.hidden.unique_id if cls.hidden else None)
        act_map = fit_map(
            model,
            clip,
            source_prompts,
            target_prompts,
            preset=preset,
            parts=parts,
            method=method,
            support=support,
            mode=mode,
            seed=fit_seed,
            width=width,
            height=height,
            steps=steps,
            cfg=cfg,
            sampler_name=sampler_name,
            scheduler=scheduler,
            negative_prompt=negative_prompt,
            batch_size=batch_size,
            causal_strategy=causal_strategy,
            progress=lambda done, total: bar.update_absolute(done, total),
        )
        return io.NodeOutput(act_map, act_map.summary())


class ACTApply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ACTApply",
            display_name="Apply ACT",
            category=CATEGORY,
            description=(
                "Apply an ACT map with strength lambda (0 = the model unchanged, 1 = full transport, values outside "
                "0..1 extrapolate). Returns patched copies; the input MODEL and CLIP are untouched. Foldable maps "
                "become weight patches (zero cost, stack with LoRAs, act on every CFG row); others become hooks "
                "that act on the cond rows of CFG, pick the map of the current noise level, and respect an "
                "optional start/end window."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to steer (it is cloned, not modified)."),
                io.Clip.Input(
                    "clip",
                    tooltip="The text encoders to steer (cloned, not modified); passed through when the map has no "
                    "text-encoder part.",
                ),
                _map_input(),
                _strength_input(
                    "strength",
                    "lambda: 0 = off, 1 = full transport; negative values push the other way.",
                ),
                io.Boolean.Input(
                    "separate_text_encoder_strength",
                    default=False,
                    optional=True,
                    tooltip="Use text_encoder_strength for the map's text-encoder parts instead of strength.",
                ),
                _strength_input(
                    "text_encoder_strength",
                    "lambda for the text encoders when separate_text_encoder_strength is on.",
                    optional=True,
                ),
                *_window_inputs(),
            ],
            outputs=[
                io.Model.Output(
                    "model_out", display_name="model", tooltip="The model with the map's UNet part."
                ),
                io.Clip.Output(
                    "clip_out", display_name="clip", tooltip="The CLIP with the map's text-encoder part."
                ),
            ],
        )

    @classmethod
    def execute(
        cls,
        model,
        clip,
        act_map,
        strength,
        separate_text_encoder_strength=False,
        text_encoder_strength=1.0,
        start_percent=0.0,
        end_percent=1.0,
    ) -> io.NodeOutput:
        from .applying import apply_map

        te = text_encoder_strength if separate_text_encoder_strength else None
        patched_model, patched_clip, _ = apply_map(
            model, clip, _checked_map(act_map), strength, te, start_percent, end_percent
        )
        return io.NodeOutput(patched_model, patched_clip)


def _overwrite_input() -> io.Input:
    return io.Boolean.Input(
        "overwrite",
        default=False,
        tooltip="Replace an existing file of that name (otherwise it is an error).",
    )


class ACTSaveMap(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ACTSaveMap",
            display_name="Save ACT map",
            category=CATEGORY,
            description=(
                "Save an ACT map as a .safetensors file (tensors plus JSON metadata; no code) in ComfyUI's "
                "models/act_maps folder. The file also loads in diffusers (act_core.ACTMap.load)."
            ),
            inputs=[
                _map_input(),
                io.String.Input(
                    "filename",
                    default="act_map",
                    tooltip="File name inside models/act_maps (subfolders with '/'); .safetensors is appended. "
                    "No '..' or absolute paths.",
                ),
                _overwrite_input(),
            ],
            outputs=[
                io.String.Output(
                    "map_name", display_name="map_name", tooltip="The saved file's name inside act_maps."
                )
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, act_map, filename, overwrite) -> io.NodeOutput:
        act_map = _checked_map(act_map)
        relative = write_into_folder(FOLDER, filename, overwrite, "map file name", act_map.save)
        return io.NodeOutput(relative, ui={"text": [relative]})


class ACTLoadMap(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ACTLoadMap",
            display_name="Load ACT map",
            category=CATEGORY,
            description="Load an ACT map (.safetensors) from ComfyUI's models/act_maps folder; maps saved by "
            "diffusers or the act CLI load too.",
            inputs=[
                io.Combo.Input(
                    "act_map_name",
                    options=list_maps(),
                    tooltip="A map file in models/act_maps (refresh the page after adding files).",
                )
            ],
            outputs=[
                ActMap.Output("act_map", display_name="act_map", tooltip="The loaded ACT map."),
                io.String.Output(
                    "summary", display_name="summary", tooltip="A short text description of the map."
                ),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, act_map_name):
        try:
            stat = os.stat(map_path(act_map_name))
        except (ACTInputError, OSError):
            return ""
        return f"{stat.st_mtime_ns}:{stat.st_size}"

    @classmethod
    def execute(cls, act_map_name) -> io.NodeOutput:
        act_map = ACTMap.load(map_path(act_map_name))
        return io.NodeOutput(act_map, act_map.summary())


class ACTExportLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ACTExportLoRA",
            display_name="Export ACT as LoRA",
            category=CATEGORY,
            description=(
                "Export a foldable ACT map (preset unet_norms_foldable, or text_encoder_norms with support "
                "'unbounded') as a LoRA-style file of weight diffs in models/loras. The stock 'Load LoRA' node then "
                "applies it with strength = lambda, no ACT node needed. Time-aware maps (one per noise level) and "
                "maps with bounded support cannot be written into weights."
            ),
            inputs=[
                io.Model.Input(
                    "model", tooltip="The model the map was fitted on (its norm weights enter the diffs)."
                ),
                io.Clip.Input(
                    "clip", tooltip="The text encoders the map was fitted on (for text-encoder parts)."
                ),
                _map_input(),
                io.String.Input(
                    "filename",
                    default="act_lora",
                    tooltip="File name inside models/loras (subfolders with '/'); .safetensors is appended.",
                ),
                io.Combo.Input(
                    "dtype",
                    options=LORA_DTYPES,
                    default="fp32",
                    tooltip="fp32: exact (norm diffs are small files); fp16: half the size, refused when a diff "
                    "overflows it.",
                ),
                _overwrite_input(),
            ],
            outputs=[
                io.String.Output(
                    "lora_name", display_name="lora_name", tooltip="The written file's name in loras."
                )
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, clip, act_map, filename, dtype, overwrite) -> io.NodeOutput:
        from act_core.lora import DTYPES

        from .exporting import export_map

        act_map = _checked_map(act_map)
        if dtype not in DTYPES:
            raise ACTInputError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")
        relative = write_into_folder(
            "loras",
            filename,
            overwrite,
            "LoRA file name",
            lambda path: export_map(model, clip, act_map, path, dtype),
        )
        return io.NodeOutput(relative, ui={"text": [relative]})


class ACTSweep(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        samplers, schedulers = _sampler_choices()
        return io.Schema(
            node_id="ACTSweep",
            display_name="ACT lambda sweep",
            category=CATEGORY,
            description=(
                "Render the same prompt and seed once per lambda value (e.g. '0, 0.25, 0.5, 0.75, 1') with the ACT "
                "map applied at that strength, as one LATENT batch: VAE Decode + Preview Image show the slider."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model (the map is applied to clones)."),
                io.Clip.Input("clip", tooltip="The text encoders that encode the prompts."),
                _map_input(),
                io.Latent.Input("latent_image", tooltip="The starting latent, e.g. from Empty Latent Image."),
                io.String.Input(
                    "positive",
                    multiline=True,
                    default="a photo of a lighthouse on a cliff at sunset",
                    tooltip="The prompt to render at every lambda.",
                ),
                io.String.Input(
                    "negative", multiline=True, default="", tooltip="The negative prompt (cfg > 1)."
                ),
                io.String.Input(
                    "lambdas",
                    default="0, 0.25, 0.5, 0.75, 1",
                    tooltip="Strengths to render, separated by commas, spaces or semicolons (0 = the model).",
                ),
                io.Int.Input(
                    "seed", default=0, min=0, max=MAX_SEED, tooltip="Noise seed, the same for every lambda."
                ),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="Denoising steps."),
                io.Float.Input(
                    "cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01, tooltip="CFG scale."
                ),
                io.Combo.Input("sampler_name", options=samplers, default="euler", tooltip="The sampler."),
                io.Combo.Input(
                    "scheduler", options=schedulers, default="normal", tooltip="The noise schedule."
                ),
                io.Float.Input(
                    "denoise",
                    default=1.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Amount of denoising (1 = all).",
                ),
                *_window_inputs(),
            ],
            outputs=[
                io.Latent.Output(
                    "latent", display_name="latent", tooltip="One latent per lambda, in the order given."
                ),
                io.String.Output(
                    "lambda_labels", display_name="lambdas", tooltip="The lambda values, as labels."
                ),
            ],
        )

    @classmethod
    def execute(
        cls,
        model,
        clip,
        act_map,
        latent_image,
        positive,
        negative,
        lambdas,
        seed,
        steps,
        cfg,
        sampler_name,
        scheduler,
        denoise,
        start_percent=0.0,
        end_percent=1.0,
    ) -> io.NodeOutput:
        from .sweeping import sweep

        latent, labels = sweep(
            model,
            clip,
            _checked_map(act_map),
            positive,
            negative,
            latent_image,
            lambdas,
            seed,
            steps,
            cfg,
            sampler_name,
            scheduler,
            denoise,
            start_percent,
            end_percent,
        )
        return io.NodeOutput(latent, labels)


NODES: list[type[io.ComfyNode]] = [ACTFitMap, ACTApply, ACTSaveMap, ACTLoadMap, ACTExportLoRA, ACTSweep]


class ACTExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)

"""The ACT nodes (classic V1 contract, so the schemas import and are tested without ComfyUI)."""

from __future__ import annotations

import os

from act_core.errors import ACTInputError
from act_core.families.sdxl import DEFAULT_PRESET, PRESETS
from act_core.maps import ACTMap

from .common import (
    ACT_MAP,
    CATEGORY,
    CAUSAL_STRATEGIES,
    DEFAULT_SOURCE_PROMPTS,
    DEFAULT_TARGET_PROMPTS,
    FALLBACK_SAMPLERS,
    FALLBACK_SCHEDULERS,
    LORA_DTYPES,
    MAX_SEED,
    METHODS,
    MODES,
    PRESET_NAMES,
    STRENGTH_SPEC,
    SUPPORTS,
)
from .folders import FOLDER, list_maps, map_path, save_folder, target_path

_PRESET_HELP = "; ".join(f"{name}: {preset.description}" for name, preset in PRESETS.items())
_MAP_INPUT = (ACT_MAP, {"tooltip": "An ACT map, from 'Fit ACT map' or 'Load ACT map'."})
_WINDOW = {
    "start_percent": (
        "FLOAT",
        {
            "default": 0.0,
            "min": 0.0,
            "max": 1.0,
            "step": 0.01,
            "tooltip": "Fraction of denoising at which UNet transport starts (0 = first step). A window other "
            "than 0..1 needs hooks, so foldable maps are then applied with hooks too.",
        },
    ),
    "end_percent": (
        "FLOAT",
        {
            "default": 1.0,
            "min": 0.0,
            "max": 1.0,
            "step": 0.01,
            "tooltip": "Fraction of denoising at which UNet transport stops (1 = last step). Text-encoder maps "
            "act on the prompt encoding and ignore the window.",
        },
    ),
}


def _sampler_choices() -> tuple[list[str], list[str]]:
    try:
        import comfy.samplers

        return list(comfy.samplers.KSampler.SAMPLERS), list(comfy.samplers.KSampler.SCHEDULERS)
    except Exception:  # no ComfyUI (schema tests): the common names
        return list(FALLBACK_SAMPLERS), list(FALLBACK_SCHEDULERS)


def _progress_bar(node_id=None):
    import comfy.utils

    # node_id given explicitly: fitting reports progress from worker threads, which do not see ComfyUI's
    # executing-node context variable
    return comfy.utils.ProgressBar(1, node_id=node_id)


class ACTFitMap:
    DESCRIPTION = (
        "Fit an Activation Transport (ACT) map that moves generations for the source prompts toward the target "
        "prompts (Rodriguez et al., ICLR 2025). The model runs once per prompt at the FIRST denoising step "
        "(cond branch, guidance off); per channel of every hooked norm layer, a 1-D optimal transport map "
        "(sort and pair) is fitted. Use many varied prompt pairs (dozens to hundreds) for a robust map. "
        "Text-encoder presets run the text encoders only. Interrupting stops the fit and leaves the model as it was."
    )
    CATEGORY = CATEGORY
    FUNCTION = "fit"
    RETURN_TYPES = (ACT_MAP, "STRING")
    RETURN_NAMES = ("act_map", "summary")
    OUTPUT_TOOLTIPS = (
        "The fitted ACT map (canonical diffusers module names: portable between ComfyUI and diffusers).",
        "A short text description of the map (modules, method, support).",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (
                    "MODEL",
                    {"tooltip": "The diffusion model (SD 1.x / SDXL UNet) to fit the map on."},
                ),
                "clip": (
                    "CLIP",
                    {
                        "tooltip": "The text encoders that encode the prompts (and are fitted by text-encoder presets)."
                    },
                ),
                "source_prompts": (
                    "STRING",
                    {
                        "multiline": True,
                        "default": DEFAULT_SOURCE_PROMPTS,
                        "tooltip": "Prompts WITHOUT the property (p in the paper), one per line; blank lines are ignored.",
                    },
                ),
                "target_prompts": (
                    "STRING",
                    {
                        "multiline": True,
                        "default": DEFAULT_TARGET_PROMPTS,
                        "tooltip": "Prompts WITH the property to transport toward (q), one per line; ideally the same "
                        "prompts as the source with the style added. Use a similar number of lines as the source.",
                    },
                ),
                "preset": (
                    PRESET_NAMES,
                    {
                        "default": DEFAULT_PRESET,
                        "tooltip": "Which modules are hooked and how. " + _PRESET_HELP,
                    },
                ),
                "parts": (
                    "STRING",
                    {
                        "default": "",
                        "tooltip": "Optional comma-separated subset of the preset's parts (unet, text_encoder, text_encoder_2); empty = all.",
                    },
                ),
                "method": (
                    METHODS,
                    {
                        "default": "linear",
                        "tooltip": "linear: Linear-AcT (the paper's best); mean: shift only; gaussian: Gaussian OT (std ratio).",
                    },
                ),
                "support": (
                    SUPPORTS,
                    {
                        "default": "auto",
                        "tooltip": "Where the map acts. auto: the preset's choice (source [min, max] for linear, unbounded for "
                        "the foldable preset); range: source [min, max]; unbounded: everywhere (needed for LoRA export); "
                        "qLO-HI: an inner quantile range of the source.",
                    },
                ),
                "mode": (
                    MODES,
                    {
                        "default": "preset",
                        "tooltip": "preset: the preset's own mode (causal, except text_encoder_and_unet_norms: at_once); causal (paper default): each layer is fitted with the earlier layers' maps applied; at_once: all layers from one plain pass.",
                    },
                ),
                "fit_seed": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": MAX_SEED,
                        "tooltip": "Noise seed of the statistics pass; prompt i uses seed + i (same noise for source and target line i).",
                    },
                ),
                "width": (
                    "INT",
                    {
                        "default": 1024,
                        "min": 64,
                        "max": 8192,
                        "step": 8,
                        "tooltip": "Image width of the statistics pass (pixels, multiple of 8).",
                    },
                ),
                "height": (
                    "INT",
                    {
                        "default": 1024,
                        "min": 64,
                        "max": 8192,
                        "step": 8,
                        "tooltip": "Image height of the statistics pass (pixels, multiple of 8).",
                    },
                ),
                "steps": (
                    "INT",
                    {
                        "default": 20,
                        "min": 1,
                        "max": 1000,
                        "tooltip": "Length of the noise schedule; only its FIRST step is run (statistics at the highest noise level).",
                    },
                ),
                "batch_size": (
                    "INT",
                    {
                        "default": 4,
                        "min": 1,
                        "max": 256,
                        "tooltip": "Prompts per model call while fitting (larger is faster and needs more memory).",
                    },
                ),
            },
            "optional": {
                "causal_strategy": (
                    CAUSAL_STRATEGIES,
                    {
                        "default": "auto",
                        "tooltip": "How causal fitting runs. lockstep: one pass, all batches at once in threads (more memory); "
                        "groupwise: one shorter pass per group of layers; auto: lockstep when it fits in memory.",
                    },
                ),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def fit(
        self,
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
        unique_id=None,
    ):
        from .fitting import fit_map

        bar = _progress_bar(unique_id)
        act_map, _ = fit_map(
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
            batch_size=batch_size,
            causal_strategy=causal_strategy,
            progress=lambda done, total: bar.update_absolute(done, total),
        )
        return (act_map, act_map.summary())


class ACTApply:
    DESCRIPTION = (
        "Apply an ACT map with strength lambda (0 = the model unchanged, 1 = full transport, values outside "
        "0..1 extrapolate). Returns patched copies; the input MODEL and CLIP are untouched. Maps from the "
        "foldable preset become weight patches (zero cost, stack with LoRAs); others become hooks that act on "
        "the cond branch of CFG only, optionally within a start/end window of denoising."
    )
    CATEGORY = CATEGORY
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL", "CLIP")
    RETURN_NAMES = ("model", "clip")
    OUTPUT_TOOLTIPS = (
        "The model with the map's UNet part applied.",
        "The CLIP with the map's text-encoder part applied.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model to steer (it is cloned, not modified)."}),
                "clip": (
                    "CLIP",
                    {
                        "tooltip": "The text encoders to steer (cloned, not modified); passed through when the map has no text-encoder part."
                    },
                ),
                "act_map": _MAP_INPUT,
                "strength": (
                    "FLOAT",
                    dict(
                        STRENGTH_SPEC,
                        tooltip="lambda: 0 = off, 1 = full transport (the paper's best for SDXL); negative values push the other way.",
                    ),
                ),
            },
            "optional": {
                "separate_text_encoder_strength": (
                    "BOOLEAN",
                    {
                        "default": False,
                        "tooltip": "Use text_encoder_strength for the map's text-encoder parts instead of strength.",
                    },
                ),
                "text_encoder_strength": (
                    "FLOAT",
                    dict(
                        STRENGTH_SPEC,
                        tooltip="lambda for the text encoders when separate_text_encoder_strength is on.",
                    ),
                ),
                **_WINDOW,
            },
        }

    def apply(
        self,
        model,
        clip,
        act_map,
        strength,
        separate_text_encoder_strength=False,
        text_encoder_strength=1.0,
        start_percent=0.0,
        end_percent=1.0,
    ):
        from .applying import apply_map

        te = text_encoder_strength if separate_text_encoder_strength else None
        patched_model, patched_clip, _ = apply_map(
            model, clip, act_map, strength, te, start_percent, end_percent
        )
        return (patched_model, patched_clip)


class ACTSaveMap:
    DESCRIPTION = (
        "Save an ACT map as a .safetensors file (tensors plus JSON metadata; no code) in ComfyUI's "
        "models/act_maps folder. The file also loads in diffusers (act_core.ACTMap.load)."
    )
    CATEGORY = CATEGORY
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("map_name",)
    OUTPUT_TOOLTIPS = ("The saved file's name inside act_maps (what 'Load ACT map' lists).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "act_map": _MAP_INPUT,
                "filename": (
                    "STRING",
                    {
                        "default": "act_map",
                        "tooltip": "File name inside models/act_maps (subfolders with '/'); .safetensors is appended. No '..' or absolute paths.",
                    },
                ),
                "overwrite": (
                    "BOOLEAN",
                    {
                        "default": False,
                        "tooltip": "Replace an existing file of that name (otherwise it is an error).",
                    },
                ),
            }
        }

    def save(self, act_map, filename, overwrite):
        if not isinstance(act_map, ACTMap):
            raise ACTInputError("act_map must be an ACT map.")
        relative, path = target_path(save_folder(FOLDER), filename, "map file name")
        if path.exists() and not overwrite:
            raise ACTInputError(
                f"{relative} already exists in act_maps; turn on 'overwrite' or choose another file name."
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        act_map.save(path)
        return {"ui": {"text": [relative]}, "result": (relative,)}


class ACTLoadMap:
    DESCRIPTION = "Load an ACT map (.safetensors) from ComfyUI's models/act_maps folder; maps saved by diffusers or the act CLI load too."
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (ACT_MAP, "STRING")
    RETURN_NAMES = ("act_map", "summary")
    OUTPUT_TOOLTIPS = ("The loaded ACT map.", "A short text description of the map.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "act_map_name": (
                    list_maps(),
                    {"tooltip": "A map file in models/act_maps (refresh the page after adding files)."},
                ),
            }
        }

    @classmethod
    def IS_CHANGED(cls, act_map_name):
        try:
            stat = os.stat(map_path(act_map_name))
        except (ACTInputError, OSError):
            return ""
        return f"{stat.st_mtime_ns}:{stat.st_size}"

    def load(self, act_map_name):
        act_map = ACTMap.load(map_path(act_map_name))
        return (act_map, act_map.summary())


class ACTExportLoRA:
    DESCRIPTION = (
        "Export a foldable ACT map (preset unet_norms_foldable, or support 'unbounded') as a LoRA-style file of "
        "weight diffs in models/loras. The stock 'Load LoRA' node then applies it with strength = lambda, no ACT "
        "node needed. Maps with bounded support or spatial-mean maps cannot be folded into weights."
    )
    CATEGORY = CATEGORY
    FUNCTION = "export"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("lora_name",)
    OUTPUT_TOOLTIPS = ("The written file's name inside loras (what 'Load LoRA' lists).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (
                    "MODEL",
                    {"tooltip": "The model the map was fitted on (its norm weights enter the diffs)."},
                ),
                "clip": (
                    "CLIP",
                    {"tooltip": "The text encoders the map was fitted on (used for text-encoder parts)."},
                ),
                "act_map": _MAP_INPUT,
                "filename": (
                    "STRING",
                    {
                        "default": "act_lora",
                        "tooltip": "File name inside models/loras (subfolders with '/'); .safetensors is appended.",
                    },
                ),
                "dtype": (
                    LORA_DTYPES,
                    {"default": "fp16", "tooltip": "fp16: half the size (usual for LoRAs); fp32: exact."},
                ),
                "overwrite": (
                    "BOOLEAN",
                    {
                        "default": False,
                        "tooltip": "Replace an existing file of that name (otherwise it is an error).",
                    },
                ),
            }
        }

    def export(self, model, clip, act_map, filename, dtype, overwrite):
        from act_core.lora import export_lora

        from .comfy_models import check_fits, modules_for, state_key, unet_table, weight_shells, weights_of

        if not isinstance(act_map, ACTMap):
            raise ACTInputError("act_map must be an ACT map.")
        relative, path = target_path(save_folder("loras"), filename, "LoRA file name")
        if path.exists() and not overwrite:
            raise ACTInputError(
                f"{relative} already exists in loras; turn on 'overwrite' or choose another file name."
            )
        table = unet_table(model) if "unet" in act_map.parts() else None
        modules = modules_for(act_map, model, clip, table)
        check_fits(act_map, modules, "this MODEL/CLIP")
        keys = {name: state_key(name, table) for name in act_map.modules}
        shells = {}
        for owner, names in (
            (model, [n for n in act_map.modules if n.startswith("unet.")]),
            (
                clip.patcher if clip is not None else None,
                [n for n in act_map.modules if not n.startswith("unet.")],
            ),
        ):
            if not names:
                continue
            wanted = [
                f"{keys[n]}.{p}"
                for n in names
                for p in ("weight", "bias")
                if modules[n]._parameters.get(p) is not None
            ]
            shells.update(
                weight_shells(
                    {n: modules[n] for n in names}, weights_of(owner, wanted, with_patches=False), keys
                )
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        export_lora(act_map, shells, path, strength=1.0, dtype=dtype)
        return {"ui": {"text": [relative]}, "result": (relative,)}


class ACTSweep:
    DESCRIPTION = (
        "Render the same prompt and seed once per lambda value (e.g. '0, 0.25, 0.5, 0.75, 1') with the ACT map "
        "applied at that strength, as one LATENT batch: VAE Decode + Preview Image show the slider at a glance."
    )
    CATEGORY = CATEGORY
    FUNCTION = "sweep"
    RETURN_TYPES = ("LATENT", "STRING")
    RETURN_NAMES = ("latent", "lambdas")
    OUTPUT_TOOLTIPS = (
        "One denoised latent per lambda (per input latent), in the order given.",
        "The lambda values, as text labels.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        samplers, schedulers = _sampler_choices()
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model (the map is applied to clones)."}),
                "clip": (
                    "CLIP",
                    {
                        "tooltip": "The text encoders that encode the prompts (steered too when the map has text-encoder parts)."
                    },
                ),
                "act_map": _MAP_INPUT,
                "latent_image": (
                    "LATENT",
                    {
                        "tooltip": "The starting latent, e.g. from Empty Latent Image (batch 1 gives one image per lambda)."
                    },
                ),
                "positive": (
                    "STRING",
                    {
                        "multiline": True,
                        "default": "a photo of a lighthouse on a cliff at sunset",
                        "tooltip": "The prompt to render at every lambda.",
                    },
                ),
                "negative": (
                    "STRING",
                    {"multiline": True, "default": "", "tooltip": "The negative prompt (used when cfg > 1)."},
                ),
                "lambdas": (
                    "STRING",
                    {
                        "default": "0, 0.25, 0.5, 0.75, 1",
                        "tooltip": "Strengths to render, separated by commas (0 = the model unchanged).",
                    },
                ),
                "seed": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": MAX_SEED,
                        "tooltip": "Noise seed, the same for every lambda.",
                    },
                ),
                "steps": ("INT", {"default": 20, "min": 1, "max": 10000, "tooltip": "Denoising steps."}),
                "cfg": (
                    "FLOAT",
                    {
                        "default": 7.0,
                        "min": 0.0,
                        "max": 100.0,
                        "step": 0.1,
                        "round": 0.01,
                        "tooltip": "Classifier-free guidance scale.",
                    },
                ),
                "sampler_name": (samplers, {"default": "euler", "tooltip": "The sampling algorithm."}),
                "scheduler": (schedulers, {"default": "normal", "tooltip": "The noise schedule."}),
                "denoise": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "Amount of denoising (1 = from pure noise).",
                    },
                ),
            },
            "optional": dict(_WINDOW),
        }

    def sweep(
        self,
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
    ):
        from .sweeping import sweep

        if not isinstance(act_map, ACTMap):
            raise ACTInputError("act_map must be an ACT map.")
        return sweep(
            model,
            clip,
            act_map,
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


NODE_CLASS_MAPPINGS = {
    "ACTFitMap": ACTFitMap,
    "ACTApply": ACTApply,
    "ACTSaveMap": ACTSaveMap,
    "ACTLoadMap": ACTLoadMap,
    "ACTExportLoRA": ACTExportLoRA,
    "ACTSweep": ACTSweep,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "ACTFitMap": "Fit ACT map",
    "ACTApply": "Apply ACT",
    "ACTSaveMap": "Save ACT map",
    "ACTLoadMap": "Load ACT map",
    "ACTExportLoRA": "Export ACT as LoRA",
    "ACTSweep": "ACT lambda sweep",
}

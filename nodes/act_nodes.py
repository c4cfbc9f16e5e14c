"""The ACT nodes on ComfyUI's V3 API (``comfy_api.latest``): schemas that read like forms, work in the
modules beside this one. Imported only inside ComfyUI (``nodes.comfy_entrypoint``)."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator

from comfy_api.latest import ComfyExtension, io
from typing_extensions import override

import act_core
from act_core.distill import FOLD_STEPS
from act_core.errors import ACTInputError, ACTWarning
from act_core.maps import ACTMap

from .common import (
    ACT_MAP,
    CATEGORY,
    CAUSAL_STRATEGIES,
    DEFAULT_PRESET,
    DEFAULT_SOURCE_PROMPTS,
    DEFAULT_TARGET_PROMPTS,
    DISPLAY_NAMES,
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
# Tooltips are short and plain (hover text); the presets and options are explained in docs/comfyui.md.


def _sampler_choices() -> tuple[list[str], list[str]]:
    try:
        import comfy.samplers

        return list(comfy.samplers.KSampler.SAMPLERS), list(comfy.samplers.KSampler.SCHEDULERS)
    except Exception:  # ComfyUI without its sampler module: the common names
        return list(FALLBACK_SAMPLERS), list(FALLBACK_SCHEDULERS)


def show_on_node(node_id: str | None, text: str) -> None:
    """Text under the node in the browser (ComfyUI's progress text), as the core's nodes show sizes or
    progress. A no-op outside the server (in-process tests, scripts)."""
    try:
        from server import PromptServer

        PromptServer.instance.send_progress_text(text, node_id)
    except Exception:  # no server, or no client connected: nobody to tell
        pass


_OUR_SOURCES = (
    os.path.dirname(os.path.abspath(act_core.__file__)),
    os.path.dirname(os.path.abspath(__file__)),
)


@contextlib.contextmanager
def collected_warnings() -> Iterator[list[str]]:
    """The messages of ACT's warnings raised inside the block (ACTWarning, or any warning from act_core or
    these nodes: not torch's or ComfyUI's), each once, in order. Every warning still reaches the server log
    as before, even when the block raises (an interrupted fit)."""
    messages: list[str] = []
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # also a warning already shown by an earlier fit
            yield messages
    finally:  # the block is done (or raised): its warnings go to the server log as before, ours to messages
        shown = set()
        for record in caught:
            key = (str(record.message), record.category, record.filename, record.lineno)
            if key not in shown:  # once per place, as Python's default filter shows them (not once per step)
                shown.add(key)
                warnings.showwarning(record.message, record.category, record.filename, record.lineno)
            source = os.path.abspath(record.filename)
            ours = issubclass(record.category, ACTWarning) or source.startswith(_OUR_SOURCES)
            if ours and str(record.message) not in messages:
                messages.append(str(record.message))


def with_warnings(summary: str, messages: list[str]) -> str:
    """The map summary with the fit's warnings after it (the Fit node's summary output)."""
    if not messages:
        return summary
    return summary + "\n\nWarnings:\n" + "\n".join(f"- {message}" for message in messages)


def _map_input() -> io.Input:
    return ActMap.Input("act_map", tooltip="An ACT map, from 'Fit ACT map' or 'Load ACT map'.")


def _checked_map(act_map: object) -> ACTMap:
    if not isinstance(act_map, ACTMap):
        raise ACTInputError("act_map must be an ACT map (from 'Fit ACT map' or 'Load ACT map').")
    return act_map


def advanced(entry: io.Input) -> io.Input:
    """An input that only matters for a non-default choice (another preset, a text-encoder strength of its
    own, a window): marked ``advanced``, which frontends that know it hide behind the node's "Show Advanced"
    menu entry. Only a flag in the schema: the widget keeps its place, so saved workflows' widget values still
    line up (ComfyUI 0.3.64's frontend 1.27.10 reads the flag but still draws these widgets)."""
    entry.extra_dict = {**entry.extra_dict, "advanced": True}
    return entry


def _strength_input(name: str, tooltip: str, optional: bool = False) -> io.Input:
    return io.Float.Input(
        name, display_mode=io.NumberDisplay.slider, optional=optional, tooltip=tooltip, **STRENGTH_RANGE
    )


def _window_inputs() -> list[io.Input]:
    return [
        advanced(
            io.Float.Input(
                "start_percent",
                default=0.0,
                min=0.0,
                max=1.0,
                step=0.01,
                optional=True,
                tooltip="When steering starts, as a fraction of the sampling (0 = from the first step).",
            )
        ),
        advanced(
            io.Float.Input(
                "end_percent",
                default=1.0,
                min=0.0,
                max=1.0,
                step=0.01,
                optional=True,
                tooltip="When steering stops, as a fraction of the sampling (1 = until the last step). Maps "
                "of the text encoders act on the prompt and ignore it.",
            )
        ),
    ]


def _size_and_steps_inputs() -> list[io.Input]:
    """Image size and steps as you sample them (the Fit and Fold nodes follow your KSampler)."""
    return [
        io.Int.Input(
            "width", default=1024, min=64, max=8192, step=8, tooltip="The image width you sample at."
        ),
        io.Int.Input(
            "height", default=1024, min=64, max=8192, step=8, tooltip="The image height you sample at."
        ),
        io.Int.Input(
            "steps",
            default=20,
            min=1,
            max=1000,
            tooltip="The steps you sample with: the same as your KSampler's.",
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
            tooltip="The cfg you sample with: the same as your KSampler's (1 for FLUX).",
        ),
        io.Combo.Input(
            "sampler_name",
            options=samplers,
            default="euler",
            optional=optional,
            tooltip="The sampler you sample with: the same as your KSampler's.",
        ),
        io.Combo.Input(
            "scheduler",
            options=schedulers,
            default="normal",
            optional=optional,
            tooltip="The scheduler you sample with: the same as your KSampler's.",
        ),
    ]


class ACTFitMap(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ACTFitMap",
            display_name=DISPLAY_NAMES["ACTFitMap"],
            category=CATEGORY,
            description=(
                "Fit an ACT (Activation Transport) map: a steering slider learned from two prompt lists, "
                "that moves images of the source prompts toward the target prompts. The prompt pairs are "
                "sampled with your sampler settings, so give it the steps, cfg, sampler, scheduler and size "
                "of your KSampler. Use many varied pairs (dozens or more). Leave preset on 'default' and the "
                "options below it as they are unless you experiment. Cancel stops the fit and leaves the "
                "model as it was."
            ),
            inputs=[
                io.Model.Input(
                    "model",
                    tooltip="The model to steer: SDXL (or SD 1.x) or FLUX.1.",
                ),
                io.Clip.Input(
                    "clip",
                    tooltip="The text encoders that read the prompts.",
                ),
                io.String.Input(
                    "source_prompts",
                    multiline=True,
                    default=DEFAULT_SOURCE_PROMPTS,
                    tooltip="Prompts WITHOUT the effect, one per line (blank lines are skipped).",
                ),
                io.String.Input(
                    "target_prompts",
                    multiline=True,
                    default=DEFAULT_TARGET_PROMPTS,
                    tooltip="Prompts WITH the effect, one per line: best the same prompts as the source "
                    "ones with the style added (line 1 pairs with line 1, and so on).",
                ),
                io.Combo.Input(
                    "preset",
                    options=PRESET_NAMES,
                    default=DEFAULT_PRESET,
                    tooltip="Which layers the map changes. Leave 'default': it picks the preset made for "
                    "the connected model's family (SDXL, FLUX.1 and others). The other presets are for "
                    "experiments; each works on one model family only.",
                ),
                advanced(
                    io.String.Input(
                        "parts",
                        default="",
                        tooltip="Leave empty (all of the preset). To fit only part of it, name the parts, "
                        "e.g. 'unet' or 'text_encoder' (comma-separated).",
                    )
                ),
                advanced(
                    io.Combo.Input(
                        "method",
                        options=METHODS,
                        default="linear",
                        tooltip="How activations are moved. linear: the best (default); mean: a plain "
                        "shift; gaussian: a variant.",
                    )
                ),
                advanced(
                    io.Combo.Input(
                        "support",
                        options=SUPPORTS,
                        default="auto",
                        tooltip="Where the map acts. Leave 'auto'. unbounded: everywhere (needed to export "
                        "a LoRA); range and the q options: only on values seen in the source prompts.",
                    )
                ),
                advanced(
                    io.Combo.Input(
                        "mode",
                        options=MODES,
                        default="preset",
                        tooltip="Leave 'preset'. causal: each layer is fitted with the earlier layers "
                        "already steered; at_once: all layers from the unsteered model.",
                    )
                ),
                io.Int.Input(
                    "fit_seed",
                    default=0,
                    min=0,
                    max=MAX_SEED,
                    tooltip="Noise seed of the fit (prompt pair i uses seed + i).",
                ),
                *_size_and_steps_inputs(),
                advanced(
                    io.Int.Input(
                        "batch_size",
                        default=4,
                        min=1,
                        max=256,
                        optional=True,
                        tooltip="Only for the first-step presets (unet_norms_first_step, "
                        "unet_norms_foldable, the text_encoder ones): prompts per model call. The default "
                        "preset ignores it.",
                    )
                ),
                advanced(
                    io.Combo.Input(
                        "causal_strategy",
                        options=CAUSAL_STRATEGIES,
                        default="auto",
                        optional=True,
                        tooltip="Only for the first-step presets: how the layers are fitted in turn. Leave "
                        "'auto' (the fastest that fits in memory).",
                    )
                ),
                *_sampling_inputs(optional=True),
                io.String.Input(
                    "negative_prompt",
                    multiline=True,
                    default="",
                    optional=True,
                    tooltip="The negative prompt you sample with (not used at cfg 1).",
                ),
                io.String.Input(
                    "less_prompts",
                    multiline=True,
                    default="",
                    optional=True,
                    tooltip="Optional, for a two-sided slider: prompts with the OPPOSITE effect, one per line. "
                    "Then strength -1 looks like these prompts and +1 like the target prompts. Leave empty for "
                    "a one-sided slider.",
                ),
                advanced(
                    io.Int.Input(
                        "max_pairs_per_call",
                        default=0,
                        min=0,
                        max=256,
                        optional=True,
                        tooltip="0 (auto): as many prompt pairs per model call as ComfyUI's memory estimate "
                        "allows. Lower it if the fit runs out of memory: the map stays the same (the calls of "
                        "a step meet at every layer), only slower.",
                    )
                ),
            ],
            outputs=[
                ActMap.Output(
                    "act_map",
                    display_name="act_map",
                    tooltip="The fitted map: connect it to Apply ACT or Save ACT map (it also works in "
                    "diffusers).",
                ),
                io.String.Output(
                    "summary",
                    display_name="summary",
                    tooltip="What was fitted, and any warnings: connect it to Preview Any.",
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
        batch_size=4,
        causal_strategy="auto",
        cfg=7.0,
        sampler_name="euler",
        scheduler="normal",
        negative_prompt="",
        less_prompts="",
        max_pairs_per_call=0,
    ) -> io.NodeOutput:
        import comfy.utils

        from .fitting import fit_map

        # node_id given explicitly: first-step fitting reports progress from worker threads, which do not see
        # ComfyUI's executing-node context variable
        node_id = cls.hidden.unique_id if cls.hidden else None
        bar = comfy.utils.ProgressBar(1, node_id=node_id)
        with collected_warnings() as messages:
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
                less_text=less_prompts,
                max_pairs_per_call=max_pairs_per_call,
            )
        # warnings reached only the server log: the summary output (Preview Any) and the node itself show them
        summary = with_warnings(act_map.summary(), messages)
        if not messages:
            return io.NodeOutput(act_map, summary)
        show_on_node(node_id, "Warnings:\n" + "\n".join(messages))
        return io.NodeOutput(act_map, summary, ui={"text": messages})


class ACTFoldMap(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ACTFoldMap",
            display_name=DISPLAY_NAMES["ACTFoldMap"],
            category=CATEGORY,
            description=(
                "Turn a map from 'Fit ACT map' (default preset) into one fixed map that 'Export ACT as LoRA' "
                "can write as a LoRA. It samples the source prompts with the map applied and learns one "
                "fixed change per layer that gives the same images (along the prompts the map was fitted on, or "
                "yours). Give it the Fit node's "
                "sampler settings. It takes about ten times as long as the fit. Cancel stops it and leaves "
                "the model as it was."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model the map was fitted on."),
                io.Clip.Input("clip", tooltip="The text encoders that read the prompts."),
                _map_input(),
                io.String.Input(
                    "source_prompts",
                    multiline=True,
                    default="",
                    tooltip="Leave empty to use the prompts the map was fitted on (maps record them), or give "
                    "prompts like them (those WITHOUT the effect), one per line.",
                ),
                io.Int.Input(
                    "fold_seed",
                    default=0,
                    min=0,
                    max=MAX_SEED,
                    tooltip="Noise seed of the fold's samples (prompt i uses seed + i).",
                ),
                *_size_and_steps_inputs(),
                *_sampling_inputs(optional=False),
                io.String.Input(
                    "negative_prompt",
                    multiline=True,
                    default="",
                    tooltip="The negative prompt you sample with (not used at cfg 1).",
                ),
                io.Int.Input(
                    "fold_steps",
                    default=FOLD_STEPS,
                    min=1,
                    max=10000,
                    tooltip="How long the fixed map is trained. More steps follow the map more closely.",
                ),
            ],
            outputs=[
                ActMap.Output(
                    "folded_map",
                    display_name="act_map",
                    tooltip="The fixed map: connect it to Export ACT as LoRA, Apply ACT or Save ACT map.",
                ),
                io.String.Output(
                    "summary",
                    display_name="summary",
                    tooltip="What was folded, how closely it follows the map, and any warnings.",
                ),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(
        cls,
        model,
        clip,
        act_map,
        source_prompts,
        fold_seed,
        width,
        height,
        steps,
        cfg,
        sampler_name,
        scheduler,
        negative_prompt,
        fold_steps,
    ) -> io.NodeOutput:
        import comfy.utils

        from .folding import fold_node_map, fold_summary

        node_id = cls.hidden.unique_id if cls.hidden else None
        bar = comfy.utils.ProgressBar(1, node_id=node_id)
        phases = []

        def report(phase: str, done: int, total: int) -> None:
            if not phases or phases[-1] != phase:
                phases.append(phase)
                show_on_node(node_id, f"{phase} ({len(phases)} of 2)")
            bar.update_absolute(done, total)

        with collected_warnings() as messages:
            folded = fold_node_map(
                model,
                clip,
                _checked_map(act_map),
                source_prompts,
                seed=fold_seed,
                width=width,
                height=height,
                steps=steps,
                cfg=cfg,
                sampler_name=sampler_name,
                scheduler=scheduler,
                negative_prompt=negative_prompt,
                fold_steps=fold_steps,
                report=report,
            )
        summary = with_warnings(fold_summary(folded), messages)
        if not messages:
            return io.NodeOutput(folded, summary)
        show_on_node(node_id, "Warnings:\n" + "\n".join(messages))
        return io.NodeOutput(folded, summary, ui={"text": messages})


class ACTApply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ACTApply",
            display_name=DISPLAY_NAMES["ACTApply"],
            category=CATEGORY,
            description=(
                "Steer a model with an ACT map. strength is the slider: 0 = the model unchanged, 1 = the "
                "full effect, negative values push the other way and values past 1 overshoot. Returns "
                "steered copies: the input model and CLIP stay as they are, and LoRAs loaded before it keep "
                "working."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model to steer (a steered copy comes out)."),
                io.Clip.Input(
                    "clip",
                    tooltip="The text encoders, steered when the map has a text-encoder part (else passed "
                    "through).",
                ),
                _map_input(),
                _strength_input(
                    "strength",
                    "The slider: 0 = off, 1 = the full effect, negative = the opposite direction.",
                ),
                advanced(
                    io.Boolean.Input(
                        "separate_text_encoder_strength",
                        default=False,
                        label_on="own strength below",
                        label_off="same as strength",
                        optional=True,
                        tooltip="Off: the text encoders follow strength. On: they use text_encoder_strength "
                        "below.",
                    )
                ),
                advanced(
                    _strength_input(
                        "text_encoder_strength",
                        "Used only when separate_text_encoder_strength is on: the strength for the text "
                        "encoders.",
                        optional=True,
                    )
                ),
                *_window_inputs(),
            ],
            outputs=[
                io.Model.Output("model_out", display_name="model", tooltip="The steered model."),
                io.Clip.Output("clip_out", display_name="clip", tooltip="The steered text encoders."),
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
        tooltip="Replace a file of the same name (otherwise saving stops with an error).",
    )


class ACTSaveMap(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ACTSaveMap",
            display_name=DISPLAY_NAMES["ACTSaveMap"],
            category=CATEGORY,
            description=(
                "Save an ACT map as a .safetensors file in ComfyUI's models/act_maps folder, to use it again "
                "with 'Load ACT map' (press R to refresh its list) or in diffusers. The file holds numbers "
                "only, no code."
            ),
            inputs=[
                _map_input(),
                io.String.Input(
                    "filename",
                    default="act_map",
                    tooltip="File name in models/act_maps ('/' makes subfolders); .safetensors is added. "
                    "The name must stay inside the folder.",
                ),
                _overwrite_input(),
            ],
            outputs=[
                io.String.Output(
                    "map_name", display_name="map_name", tooltip="The saved file's name in models/act_maps."
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
            display_name=DISPLAY_NAMES["ACTLoadMap"],
            category=CATEGORY,
            description="Load an ACT map from ComfyUI's models/act_maps folder (maps saved from diffusers "
            "or the act command line load too). A map saved while ComfyUI runs is listed after pressing R "
            "(refresh).",
            inputs=[
                io.Combo.Input(
                    "act_map_name",
                    options=list_maps(),
                    tooltip="A map in models/act_maps. Saved a new one? Press R (or Refresh) to list it.",
                )
            ],
            outputs=[
                ActMap.Output("act_map", display_name="act_map", tooltip="The loaded ACT map."),
                io.String.Output("summary", display_name="summary", tooltip="What the map holds."),
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
            display_name=DISPLAY_NAMES["ACTExportLoRA"],
            category=CATEGORY,
            description=(
                "Write an ACT map as a LoRA file in models/loras: the stock 'Load LoRA' node then applies "
                "it, its strength being the slider, with no ACT node needed (share it like any LoRA). A map "
                "from the default preset changes at every step: pass it through 'Fold ACT map' first. Maps "
                "of the unet_norms_foldable preset (or text_encoder_norms with support 'unbounded') fit as "
                "they are."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model the map was fitted on."),
                io.Clip.Input("clip", tooltip="The text encoders the map was fitted on."),
                _map_input(),
                io.String.Input(
                    "filename",
                    default="act_lora",
                    tooltip="File name in models/loras ('/' makes subfolders); .safetensors is added.",
                ),
                advanced(
                    io.Combo.Input(
                        "dtype",
                        options=LORA_DTYPES,
                        default="fp32",
                        tooltip="fp32: exact (the files are small). fp16: half the size; refused if a value "
                        "does not fit.",
                    )
                ),
                _overwrite_input(),
            ],
            outputs=[
                io.String.Output(
                    "lora_name", display_name="lora_name", tooltip="The file's name, to pick in Load LoRA."
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
            display_name=DISPLAY_NAMES["ACTSweep"],
            category=CATEGORY,
            description=(
                "Render the same prompt and seed once per strength (lambda) value, e.g. '0, 0.25, 0.5, 0.75, "
                "1', as one batch: VAE Decode and Preview Image then show the slider from the plain model to "
                "the full effect."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model to steer (it stays as it is)."),
                io.Clip.Input("clip", tooltip="The text encoders that read the prompts."),
                _map_input(),
                io.Latent.Input("latent_image", tooltip="The starting latent, e.g. from Empty Latent Image."),
                io.String.Input(
                    "positive",
                    multiline=True,
                    default="a photo of a lighthouse on a cliff at sunset",
                    tooltip="The prompt to render at every strength.",
                ),
                io.String.Input(
                    "negative", multiline=True, default="", tooltip="The negative prompt (not used at cfg 1)."
                ),
                io.String.Input(
                    "lambdas",
                    default="0, 0.25, 0.5, 0.75, 1",
                    tooltip="The strengths to render, separated by commas (0 = the model unchanged).",
                ),
                io.Int.Input(
                    "seed", default=0, min=0, max=MAX_SEED, tooltip="Noise seed, the same for every strength."
                ),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="Sampling steps."),
                io.Float.Input(
                    "cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01, tooltip="CFG scale."
                ),
                io.Combo.Input("sampler_name", options=samplers, default="euler", tooltip="The sampler."),
                io.Combo.Input(
                    "scheduler", options=schedulers, default="normal", tooltip="The noise schedule."
                ),
                advanced(
                    io.Float.Input(
                        "denoise",
                        default=1.0,
                        min=0.0,
                        max=1.0,
                        step=0.01,
                        tooltip="How much to denoise (1 = all).",
                    )
                ),
                *_window_inputs(),
            ],
            outputs=[
                io.Latent.Output(
                    "latent", display_name="latent", tooltip="One latent per strength, in the order given."
                ),
                io.String.Output(
                    "lambda_labels", display_name="lambdas", tooltip="The strengths, as a label."
                ),
            ],
            hidden=[io.Hidden.unique_id],
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

        node_id = cls.hidden.unique_id if cls.hidden else None
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
            announce=lambda k, n, lam: show_on_node(node_id, f"lambda {k} of {n} ({lam:g})"),
        )
        return io.NodeOutput(latent, labels)


NODES: list[type[io.ComfyNode]] = [
    ACTFitMap,
    ACTApply,
    ACTSaveMap,
    ACTLoadMap,
    ACTExportLoRA,
    ACTSweep,
    ACTFoldMap,
]


class ACTExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        from .demo_models import DEMO_NODES

        return [*NODES, *DEMO_NODES]

"""Which fitting protocol steers? Every candidate, on two independently trained models, side by side.

    python -m demo.protocols                       # the full grid (about an hour on one core)
    python -m demo.protocols --quick               # the old and new defaults only
    python -m demo.protocols --only new_default --models b --tasks style

For each model (the shipped one, sampled with 20 Euler steps at guidance 3, and the second one,
``models/shapes-sdxl-b``, trained here from another seed on other pixels and sampled with 25 steps at
guidance 4), each task, and each protocol, a map is fitted with ``pipe.fit_act`` (24 + 24 prompts and the
model's own sampling settings) and applied with ``pipe.enable_act`` at several lambdas; the model's own
classifier scores the images. ``effect`` is the share of the way from lambda = 0 to the prompted
ceiling (the target written in the prompt) that lambda reaches: 1 = as if prompted. A protocol
*passes* a task when effect >= 0.8 with shape accuracy >= 0.85 at lambda = 1; the default must pass
every task on both models. Results: ``outputs/protocols/results.json`` and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from act_core.diffusers import act_pipeline
from act_core.errors import ACTWarning
from act_core.families.flux import PRESETS as FLUX_PRESETS
from act_core.families.qwenimage import PRESETS as QWENIMAGE_PRESETS
from act_core.families.sdxl import PRESETS, TEXT_ENCODER, TEXT_ENCODER_2, UNET
from act_core.families.zimage import PRESETS as ZIMAGE_PRESETS
from act_core.maps import APPLY_SPATIAL_MEAN

from .classifier import predict_proba
from .evaluation import generate
from .flux_model import MAX_SEQUENCE_LENGTH as FLUX_MAX_SEQUENCE_LENGTH
from .paths import REPO_ROOT, load_demo_classifier, load_demo_pipeline
from .shapes import IMAGE_SIZE, SHAPES, STYLES, caption
from .zimage_model import MAX_SEQUENCE_LENGTH as ZIMAGE_MAX_SEQUENCE_LENGTH

FIT_SEED, EVAL_SEED = 0, 10_000
LAMBDAS = (0.0, 0.5, 1.0, 1.5)
PASS_EFFECT, PASS_SHAPE = 0.8, 0.85
CONTENT_MARGIN = 0.1  # or within this of the prompt's own shape accuracy
# A cell counts only where the target prompt itself moves the classifier's score this far from the plain model
# (Z-Image's "dotted" prompt scores 0.00 dotted: no map can be asked to reach what the prompt does not draw).
MIN_PROMPT_SPAN = 0.3


@dataclass(frozen=True)
class Model:
    """A trained demo model, its classifier and the sampling settings it is used with."""

    name: str
    path: Path
    classifier: Path
    steps: int
    guidance: float
    family: str = "sdxl"
    sampling: dict = field(default_factory=dict)  # more pipeline arguments, for fitting and generating
    # Another sampler than the model's own: a diffusers scheduler class and config overrides.
    scheduler: tuple[str, dict] | None = None
    # Sampler transfer: generate with these (steps, scheduler) while the map was fitted with the above.
    apply_steps: int | None = None
    apply_scheduler: tuple[str, dict] | None = None


MODELS = {
    "shipped": Model(
        "shipped", REPO_ROOT / "models" / "shapes-sdxl", REPO_ROOT / "models" / "shapes-classifier", 20, 3.0
    ),
    "b": Model(
        "b", REPO_ROOT / "models" / "shapes-sdxl-b", REPO_ROOT / "models" / "shapes-classifier-b", 25, 4.0
    ),
    # Trained after the first default was chosen on shipped and b; it showed that default under-steering, and
    # the revised default was then chosen on all three (DPM-Solver++ 2M sampler).
    "c": Model(
        "c", REPO_ROOT / "models" / "shapes-sdxl-c", REPO_ROOT / "models" / "shapes-classifier-c", 30, 5.0
    ),
    # Held out: trained after the revised default was chosen, only to check it (Euler ancestral sampler).
    "d": Model(
        "d", REPO_ROOT / "models" / "shapes-sdxl-d", REPO_ROOT / "models" / "shapes-classifier-d", 30, 6.0
    ),
    # The FLUX.1-architecture shapes model (rectified flow, no CFG batch: FLUX.1's way), shipped classifier.
    "flux": Model(
        "flux",
        REPO_ROOT / "models" / "shapes-flux",
        REPO_ROOT / "models" / "shapes-classifier",
        20,
        1.0,
        family="flux",
        sampling={"max_sequence_length": FLUX_MAX_SEQUENCE_LENGTH},
    ),
    # The second FLUX model: another seed, model b's data and VAE, other sizes, 25 steps (held out: trained
    # after the FLUX default was chosen on "flux", only to check it).
    "flux-b": Model(
        "flux-b",
        REPO_ROOT / "models" / "shapes-flux-b",
        REPO_ROOT / "models" / "shapes-classifier-b",
        25,
        1.0,
        family="flux",
        sampling={"max_sequence_length": FLUX_MAX_SEQUENCE_LENGTH},
    ),
    # The Z-Image-architecture shapes model (single-stream DiT, Qwen3 captions; the shipped VAE's latents, as
    # "flux"), sampled with CFG: ZImagePipeline's guidance_scale 2 is cond + 2 (cond - uncond), the usual scale 3
    # (unguided, its samples keep the shape 0.83 of the time, 0.95 guided). ZImagePipeline has no
    # default_sample_size (its default is 1024 px): the size is a sampling setting.
    "zimage": Model(
        "zimage",
        REPO_ROOT / "models" / "shapes-zimage",
        REPO_ROOT / "models" / "shapes-classifier",
        20,
        2.0,
        family="zimage",
        sampling={
            "max_sequence_length": ZIMAGE_MAX_SEQUENCE_LENGTH,
            "height": IMAGE_SIZE,
            "width": IMAGE_SIZE,
        },
    ),
    # The Qwen-Image-architecture shapes model (double-stream MMDiT, Qwen2.5-VL text stream, its own Qwen-Image
    # VAE), sampled with true CFG 3 (the family's guidance parameter, true_cfg_scale, see generate; it runs only
    # with a negative prompt): unguided, its samples keep the shape 0.84 of the time, 0.98 guided.
    "qwenimage": Model(
        "qwenimage",
        REPO_ROOT / "models" / "shapes-qwenimage",
        REPO_ROOT / "models" / "shapes-classifier",
        20,
        3.0,
        family="qwenimage",
        sampling={"negative_prompt": ""},
    ),
}


def load_model_pipeline(model: Model):
    """The model's diffusers pipeline (the folder's own class), from disk only, wrapped by ``act_pipeline``,
    with the model's sampler."""
    pipe = act_pipeline(load_demo_pipeline(path=model.path))
    if hasattr(pipe, "default_sample_size"):
        # FluxPipeline's default size is 1024 px (a fixed default_sample_size of 128), QwenImagePipeline's 512;
        # the models draw 32 px (SDXL's default_sample_size is already the UNet's, 32 px)
        pipe.default_sample_size = IMAGE_SIZE // pipe.vae_scale_factor
    use_scheduler(pipe, model.scheduler)
    return pipe


def use_scheduler(pipe, scheduler: tuple[str, dict] | None) -> None:
    """Give ``pipe`` the diffusers scheduler ``(class name, config overrides)``; None: the model's own."""
    import diffusers

    original = getattr(pipe, "_demo_own_scheduler", None)
    if original is None:
        original = pipe._demo_own_scheduler = pipe.scheduler
    if scheduler is None:
        pipe.scheduler = original
        return
    name, overrides = scheduler
    pipe.scheduler = getattr(diffusers, name).from_config(original.config, **overrides)


def generation_settings(model: Model) -> tuple[dict, tuple[str, dict] | None]:
    """(generate() arguments, scheduler) the model's maps are applied with: its own, or the transfer's."""
    gen = {"steps": model.apply_steps or model.steps, "guidance": model.guidance, **model.sampling}
    return gen, model.apply_scheduler or model.scheduler


# Other samplers than the ones the models were trained with (issue 23): a multistep one (DPM-Solver++ 2M),
# an ancestral one, and a map fitted with the model's own sampler applied with another at another step count.
DPM_2M = ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2})
EULER_A = ("EulerAncestralDiscreteScheduler", {})
FLOW_DPM_2M = (
    "DPMSolverMultistepScheduler",
    {
        "algorithm_type": "dpmsolver++",
        "solver_order": 2,
        "use_flow_sigmas": True,
        "prediction_type": "flow_prediction",
        "use_dynamic_shifting": True,  # FluxPipeline passes its image-size shift (mu), as to its own scheduler
        "time_shift_type": "exponential",
    },
)


# Families sampled by flow matching (FlowMatchEulerDiscreteScheduler): their other samplers are flow ones.
FLOW_FAMILIES = ("flux", "zimage", "qwenimage")
# ZImagePipeline and QwenImagePipeline always set their scheduler's timesteps from sigmas of their own, which
# DPMSolverMultistepScheduler.set_timesteps does not take (diffusers 0.42.1 refuses the pipeline call): no
# DPM++ variant for them.
CUSTOM_SIGMA_FAMILIES = ("zimage", "qwenimage")


def sampler_variants(model: Model) -> dict[str, Model]:
    """The model under other samplers, and with a fit-at-one, apply-at-another sampler transfer."""
    if model.family in FLOW_FAMILIES:
        to8 = {f"{model.name}@to8": replace(model, name=f"{model.name}@to8", apply_steps=8)}
        if model.family in CUSTOM_SIGMA_FAMILIES:
            return to8
        return {
            f"{model.name}@dpm2m": replace(
                model, name=f"{model.name}@dpm2m", scheduler=FLOW_DPM_2M, steps=12
            ),
            **to8,
        }
    return {
        f"{model.name}@dpm2m": replace(model, name=f"{model.name}@dpm2m", scheduler=DPM_2M, steps=25),
        f"{model.name}@euler_a": replace(model, name=f"{model.name}@euler_a", scheduler=EULER_A, steps=25),
        f"{model.name}@to_dpm40": replace(
            model, name=f"{model.name}@to_dpm40", apply_steps=40, apply_scheduler=DPM_2M
        ),
    }


for _base in list(MODELS.values()):
    MODELS.update(sampler_variants(_base))


@dataclass(frozen=True)
class Task:
    """Fit on source/target prompts, steer the source prompts, score one classifier label."""

    name: str
    head: str
    goal: str
    source: tuple[str, ...]
    target: tuple[str, ...]
    shapes: tuple[str, ...]


def tasks() -> dict[str, Task]:
    """Every style of the shapes data (striped, outlined, dotted), three colour changes and a negation; every
    shape, so content has to be kept."""
    colours = ("red", "blue", "yellow", "orange")
    plain = [(s, c) for s in SHAPES for c in colours]
    styles = [st for st in STYLES if st != "striped"]
    per_style = [(s, st) for s in SHAPES for st in styles]

    def colour_task(name: str, source: str, target: str) -> Task:
        return Task(
            name,
            "colour",
            target,
            tuple(caption(s, source, st) for s, st in per_style),
            tuple(caption(s, target, st) for s, st in per_style),
            tuple(s for s, _ in per_style),
        )

    def style_task(name: str, style: str) -> Task:
        return Task(
            name,
            "style",
            style,
            tuple(caption(s, c, "solid") for s, c in plain),
            tuple(caption(s, c, style) for s, c in plain),
            tuple(s for s, _ in plain),
        )

    return {
        "style": Task(
            "style",
            "style",
            "striped",
            tuple(caption(s, c, "solid") for s, c in plain),
            tuple(caption(s, c, "striped") for s, c in plain),
            tuple(s for s, _ in plain),
        ),
        "outline": style_task("outline", "outlined"),
        "dotted": style_task("dotted", "dotted"),
        "colour": colour_task("colour", "green", "purple"),
        "colour_red_yellow": colour_task("colour_red_yellow", "red", "yellow"),
        "colour_blue_orange": colour_task("colour_blue_orange", "blue", "orange"),
        "negation": Task(
            "negation",
            "style",
            "striped",
            tuple(caption(s, c, "striped") for s, c in plain),
            tuple(caption(s, c, "solid") for s, c in plain),
            tuple(s for s, _ in plain),
        ),
    }


@dataclass(frozen=True)
class Protocol:
    """A fitting protocol: ``fit_act`` options, ``enable_act`` options, and what it stands for."""

    name: str
    description: str
    fit: dict = field(default_factory=dict)
    enable: dict = field(default_factory=dict)
    families: tuple[str, ...] = ("sdxl",)  # the model families it applies to
    # After the fit: (pipe, model, task, map) -> the map that is scored (issue 22: a static map that folds)
    post: Callable | None = None
    fused: bool = False  # score the map folded into the weights (fuse_act at each lambda), not hooked


_NEW = PRESETS["unet_norms"]
_ATTENTION = replace(_NEW, name="unet_attention_norms", patterns={UNET: ("*transformer_blocks.*.norm*",)})
_RESNET = replace(_NEW, name="unet_resnet_norms", patterns={UNET: ("*resnets.*.norm*",)})
_NO_OUT = replace(_NEW, name="unet_norms_but_out", patterns={UNET: ("*blocks.*norm*",)})
# SDXL's pooled-text route: add_embedding (pooled CLIP-G + size ids) is added to the time embedding.
_WITH_POOLED = replace(
    _NEW,
    name="unet_norms_and_pooled",
    patterns={UNET: ("*norm*", "add_embedding")},
    types=(*_NEW.types, nn.Module),
)
_SPATIAL = replace(_NEW, name="unet_norms_spatial_mean", apply_mode=APPLY_SPATIAL_MEAN)
_WITH_OUT = replace(
    _NEW,
    name="unet_norms_and_output",
    patterns={UNET: ("*norm*", "conv_out")},
    types=(torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.Conv2d),
)
_WITH_TEXT = replace(
    _NEW,
    name="text_encoder_and_unet_norms_trajectory",
    patterns={TEXT_ENCODER: ("*layer_norm*",), TEXT_ENCODER_2: ("*layer_norm*",), UNET: ("*norm*",)},
)

# Every family with a shapes model: the protocols that are fit options, not presets, apply to all of them.
ALL = ("sdxl", "flux", "zimage", "qwenimage")


def _flux_streams(*patterns: str):
    """The FLUX default preset on other transformer modules (block streams, ``proj_out``)."""
    return replace(
        FLUX_PRESETS["pooled_text_and_blocks"], name="flux_custom", patterns={"transformer": patterns}
    )


def _dit_streams(family: str, *patterns: str):
    """A Z-Image / Qwen-Image default preset (``transformer_blocks``) on other transformer modules."""
    presets = ZIMAGE_PRESETS if family == "zimage" else QWENIMAGE_PRESETS
    return replace(presets["transformer_blocks"], name=f"{family}_custom", patterns={"transformer": patterns})


_QWEN_STREAMS = QWENIMAGE_PRESETS["transformer_blocks"].patterns["transformer"]

PROTOCOLS = {
    p.name: p
    for p in (
        Protocol(
            "new_default",
            "the default (SDXL unet_norms, FLUX pooled_text_and_blocks, Z-Image caption_stream, Qwen-Image "
            "transformer_blocks): "
            "steered trajectory, per step, exact causal, per element, every position, calibrated",
            families=ALL,
        ),
        Protocol(
            "first_default",
            "the first trajectory default: one mean per sample, no calibration",
            {"statistic": "mean", "calibrate": False},
            families=ALL,
        ),
        Protocol(
            "mean_statistic", "new default with one mean per sample", {"statistic": "mean"}, families=ALL
        ),
        Protocol(
            "uncalibrated", "new default without the output calibration", {"calibrate": False}, families=ALL
        ),
        Protocol(
            "old_default",
            "unet_norms_first_step: the paper's (first step, range, spatial mean)",
            {"preset": "unet_norms_first_step"},
        ),
        Protocol("mean", "new default with Mean-AcT", {"method": "mean"}, families=ALL),
        Protocol(
            "range_support",
            "new default with source [min, max] support",
            {"support": "range"},
            families=ALL,
        ),
        Protocol(
            "spatial_mean", "new default, feature maps moved by their spatial mean", {"preset": _SPATIAL}
        ),
        Protocol(
            "at_once",
            "new default fitted at once (no transport while fitting)",
            {"mode": "at_once"},
            families=ALL,
        ),
        Protocol(
            "target_trajectory",
            "new default on the target's trajectory (teacher forcing)",
            {"trajectory": "target"},
            families=ALL,
        ),
        Protocol(
            "unguided_fit",
            "new default fitted without CFG (guidance 1), generated with it",
            {"guidance_scale": 1.0},
        ),
        Protocol("all_rows", "new default, hooks steer both CFG halves", enable={"cfg_rows": "all"}),
        Protocol(
            "projection_calibration",
            "new default with each step's least-squares gain (the calibration rule before issue 23), not the "
            "norm of the target prompt's move",
            {"calibration": "projection"},
            families=ALL,
        ),
        Protocol(
            "skip_early_10",
            "the default, its hooks off for the first 10 % of denoising (where shapes form)",
            enable={"start": 0.1},
            families=ALL,
        ),
        Protocol(
            "skip_early_25",
            "the default, its hooks off for the first 25 % of denoising",
            enable={"start": 0.25},
            families=ALL,
        ),
        Protocol(
            "no_guard",
            "new default with the plain Linear-AcT estimator",
            {"shrinkage": 0.0, "max_omega": 1e4},
            families=ALL,
        ),
        Protocol(
            "split_calls",
            "new default with every step split into calls of 1 pair (exact at any memory budget)",
            {"max_pairs_per_call": 1},
            families=ALL,
        ),
        Protocol(
            "half_steps_fit",
            "new default fitted at half the sampler's steps (its maps keyed by noise level), applied at all",
            {"fit_steps_divisor": 2},
            families=ALL,
        ),
        Protocol(
            "six_pairs",
            "new default fitted on 6 of the 24 prompt pairs (evenly spaced)",
            {"fit_pairs": 6},
            families=ALL,
        ),
        Protocol(
            "cheap_fit",
            "new default fitted on 6 pairs at half the steps (an eighth of the default fit's denoiser work)",
            {"fit_pairs": 6, "fit_steps_divisor": 2},
            families=ALL,
        ),
        Protocol("attention_norms", "new default on transformer-block norms only", {"preset": _ATTENTION}),
        Protocol("resnet_norms", "new default on ResNet norms only", {"preset": _RESNET}),
        Protocol(
            "without_conv_norm_out",
            "new default on all block norms, not conv_norm_out",
            {"preset": _NO_OUT},
        ),
        Protocol(
            "with_unet_output",
            "new default on every norm and the UNet's output (conv_out)",
            {"preset": _WITH_OUT},
        ),
        Protocol(
            "with_text_encoders",
            "new default + both text encoders' norms (causal across parts)",
            {"preset": _WITH_TEXT},
        ),
        Protocol(
            "text_encoder_norms",
            "text encoders only, unbounded (no UNet)",
            {"preset": "text_encoder_norms", "support": "unbounded"},
        ),
        Protocol(
            "old_combined",
            "text_encoder_and_unet_norms (first step, at once)",
            {"preset": "text_encoder_and_unet_norms"},
        ),
        Protocol(
            "first_step_all_steps",
            "paper's preset, statistics pooled over every step",
            {"preset": "unet_norms_first_step", "statistics_steps": -1},
        ),
        Protocol(
            "sdxl_with_pooled",
            "SDXL: the default + the pooled-text projection (add_embedding), as FLUX's default hooks its own",
            {"preset": _WITH_POOLED},
            families=("sdxl",),
        ),
        Protocol(
            "flux_norms",
            "FLUX: the LayerNorms before every block's modulation, along the trajectory",
            {"preset": "transformer_norms"},
            families=("flux",),
        ),
        Protocol(
            "dit_norms",
            "Z-Image / Qwen-Image: the norms before every block's modulation (their transformer_norms preset)",
            {"preset": "transformer_norms"},
            families=("zimage", "qwenimage"),
        ),
        Protocol(
            "zimage_caption_stream",
            "Z-Image: the context refiner blocks' output (the caption tokens alone, before they join the image's; "
            "the family's default preset, caption_stream, since it passed here)",
            {"preset": _dit_streams("zimage", "context_refiner.*:text")},
            families=("zimage",),
        ),
        Protocol(
            "zimage_joint_stream",
            "Z-Image: every main block's joint output of image and caption tokens (its transformer_blocks "
            "preset, the family's first default)",
            {"preset": "transformer_blocks"},
            families=("zimage",),
        ),
        Protocol(
            "zimage_caption_and_joint",
            "Z-Image: the context refiner blocks' caption tokens + every main block's joint output",
            {"preset": _dit_streams("zimage", "context_refiner.*:text", "layers.*:joint")},
            families=("zimage",),
        ),
        Protocol(
            "qwenimage_text_stream",
            "Qwen-Image: every block's text output only",
            {"preset": _dit_streams("qwenimage", "transformer_blocks.*:text")},
            families=("qwenimage",),
        ),
        Protocol(
            "qwenimage_image_stream",
            "Qwen-Image: every block's image output only",
            {"preset": _dit_streams("qwenimage", "transformer_blocks.*:image")},
            families=("qwenimage",),
        ),
        # Attempts at Qwen-Image's style shortfall (docs/demo_model.md): the default's streams and one more
        # module, or the text stream of later blocks only.
        *(
            Protocol(
                f"qwenimage_{name}",
                f"Qwen-Image: {description}",
                {"preset": _dit_streams("qwenimage", *patterns)},
                families=("qwenimage",),
            )
            for name, description, patterns in (
                ("txt_in", "the text-input projection + the default's streams", ("txt_in", *_QWEN_STREAMS)),
                ("txt_norm", "the text-input norm + the default's streams", ("txt_norm", *_QWEN_STREAMS)),
                ("img_in", "the image-input projection + the default's streams", ("img_in", *_QWEN_STREAMS)),
                ("norm_out", "the default's streams + the output norm", ("norm_out", *_QWEN_STREAMS)),
                (
                    "late_text",
                    "every block's image output + the text output of the second half of the blocks",
                    ("transformer_blocks.*:image", "transformer_blocks.1:text", "transformer_blocks.2:text"),
                ),
                (
                    "last_text",
                    "every block's image output + the last text output (the third of four blocks)",
                    ("transformer_blocks.*:image", "transformer_blocks.2:text"),
                ),
            )
        ),
        Protocol(
            "flux_image_streams",
            "FLUX: transformer_blocks without the double blocks' text stream (image and joint streams)",
            {"preset": _flux_streams("transformer_blocks.*:image", "single_transformer_blocks.*:joint")},
            families=("flux",),
        ),
        Protocol(
            "flux_text_stream",
            "FLUX: the double blocks' text stream only",
            {"preset": _flux_streams("transformer_blocks.*:text")},
            families=("flux",),
        ),
        Protocol(
            "flux_with_output",
            "FLUX: transformer_blocks + the transformer's output projection (proj_out)",
            {
                "preset": _flux_streams(
                    "transformer_blocks.*:text",
                    "transformer_blocks.*:image",
                    "single_transformer_blocks.*:joint",
                    "proj_out",
                )
            },
            families=("flux",),
        ),
        Protocol(
            "flux_output_only",
            "FLUX: the output projection (proj_out) only",
            {"preset": _flux_streams("proj_out")},
            families=("flux",),
        ),
        Protocol(
            "flux_blocks",
            "FLUX: the block output streams only (transformer_blocks, the reference's modules; the first default)",
            {"preset": "transformer_blocks"},
            families=("flux",),
        ),
        Protocol(
            "flux_pooled_norms",
            "FLUX: the pooled-text projection + the LayerNorms before every block's modulation",
            {
                "preset": _flux_streams(
                    "time_text_embed.text_embedder",
                    "transformer_blocks.*.norm1.norm",
                    "transformer_blocks.*.norm1_context.norm",
                    "transformer_blocks.*.norm2",
                    "transformer_blocks.*.norm2_context",
                    "single_transformer_blocks.*.norm.norm",
                )
            },
            families=("flux",),
        ),
        Protocol(
            "flux_pooled_only",
            "FLUX: the pooled-text projection only (time_text_embed.text_embedder: the modulation's text part)",
            {"preset": _flux_streams("time_text_embed.text_embedder")},
            families=("flux",),
        ),
        Protocol(
            "flux_text_encoders",
            "FLUX: CLIP-L and T5 layer norms only, unbounded (no transformer)",
            {"preset": "text_encoder_norms", "support": "unbounded"},
            families=("flux",),
        ),
        Protocol(
            "foldable",
            "unet_norms_foldable (first step, one map, all rows)",
            {"preset": "unet_norms_foldable"},
        ),
        Protocol(
            "static_fit",
            "the default, then one static all-rows map fitted to its hooks' guided predictions (fold_to_static)",
            post=lambda pipe, model, task, act_map: _fold_to_static(pipe, task, act_map),
        ),
        Protocol(
            "static_fit_fused",
            "static_fit, scored with the map fused into the weights (fuse_act), not hooked",
            post=lambda pipe, model, task, act_map: _fold_to_static(pipe, task, act_map),
            fused=True,
        ),
    )
}


def _fold_to_static(pipe, task: Task, act_map):
    from act_core.diffusers.folding import fold_to_static

    return fold_to_static(pipe, act_map, list(task.source), seed=FIT_SEED)


def effect(score: float, plain: float, ceiling: float) -> float:
    """Share of the way from the plain model (lambda 0) to the prompted ceiling."""
    span = ceiling - plain
    return 0.0 if abs(span) < 1e-6 else (score - plain) / span


def score_images(classifier, images, task: Task) -> dict[str, float]:
    probs = predict_proba(classifier, images)
    goal = probs[task.head][:, classifier.labels[task.head].index(task.goal)]
    shape_index = torch.tensor([classifier.labels["shape"].index(s) for s in task.shapes])
    shape_ok = probs["shape"].argmax(-1) == shape_index[: len(images)]
    return {"score": float(goal.mean()), "shape": float(shape_ok.float().mean())}


def fit_map(pipe, model: Model, task: Task, protocol: Protocol):
    """(map, seconds): ``pipe.fit_act`` with the model's sampling settings and the protocol's options."""
    fit = {
        "num_inference_steps": model.steps,
        "guidance_scale": model.guidance,
        **model.sampling,
        **protocol.fit,
    }
    divisor = fit.pop("fit_steps_divisor", 1)
    fit["num_inference_steps"] = max(2, fit["num_inference_steps"] // divisor)
    pairs = fit.pop("fit_pairs", None)
    if pairs is not None:
        task = fewer_pairs(task, pairs)
    if fit.get("statistics_steps") == -1:
        fit["statistics_steps"] = model.steps
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ACTWarning)
        act_map = pipe.fit_act(list(task.source), list(task.target), seed=FIT_SEED, progress=False, **fit)
    return act_map, time.perf_counter() - start


def score_curve(
    pipe,
    classifier,
    model: Model,
    task: Task,
    act_map,
    enable: dict,
    lambdas: Sequence[float],
    fused: bool = False,
) -> dict:
    """Scores of the source prompts at every lambda (and of the prompted ceiling); pass/fail at lambda 1.

    Generation uses the model's sampler, or the transfer's (``generation_settings``). ``distance`` is each
    lambda's mean absolute pixel change from lambda 0, as a share of lambda 1's: how gradually the image
    changes with lambda (the classifiers are near-binary; 0.25 / 0.5 / 0.75 at those lambdas is linear).
    ``fused``: each lambda's images come from the map folded into the weights at that lambda (``fuse_act``).
    """
    gen, scheduler = generation_settings(model)
    use_scheduler(pipe, scheduler)
    try:
        ceiling = score_images(classifier, generate(pipe, list(task.target), seed=EVAL_SEED, **gen), task)
        curve, images_at = [], {}
        if not fused:
            pipe.enable_act(act_map, strength=0.0, **enable)
        try:
            for lam in lambdas:
                if fused:
                    pipe.fuse_act(act_map, lam)
                else:
                    pipe.set_act_strength(lam)
                images_at[lam] = generate(pipe, list(task.source), seed=EVAL_SEED, **gen)
                if fused:
                    pipe.disable_act()
                curve.append({"lambda": lam, **score_images(classifier, images_at[lam], task)})
        finally:
            pipe.disable_act()
    finally:
        use_scheduler(pipe, model.scheduler)
    plain = curve[0]["score"]
    full = pixel_distance(images_at[1.0], images_at[0.0])
    for point in curve:
        point["effect"] = effect(point["score"], plain, ceiling["score"])
        point["distance"] = pixel_distance(images_at[point["lambda"]], images_at[0.0]) / max(full, 1e-9)
    at_one = next(p for p in curve if p["lambda"] == 1.0)
    return {
        "ceiling": ceiling["score"],
        "prompt_reaches": abs(ceiling["score"] - plain) >= MIN_PROMPT_SPAN,
        "ceiling_shape": ceiling["shape"],
        "curve": curve,
        "modules": len(act_map),
        "buckets": None if act_map.buckets is None else len(act_map.buckets),
        "passes": at_one["effect"] >= PASS_EFFECT and keeps_content(at_one["shape"], ceiling["shape"]),
    }


def keeps_content(shape: float, prompt_shape: float) -> bool:
    """The content rule: shape accuracy >= 0.85, or within 0.1 of what the prompt itself draws."""
    return shape >= PASS_SHAPE or shape >= prompt_shape - CONTENT_MARGIN


def pixel_distance(images: np.ndarray, reference: np.ndarray) -> float:
    """Mean absolute difference of two uint8 image batches, in [0, 1]."""
    return float(np.abs(images.astype(np.float64) - reference.astype(np.float64)).mean() / 255.0)


def fewer_pairs(task: Task, pairs: int | None) -> Task:
    """The task with ``pairs`` of its prompt pairs, evenly spaced (every shape and colour kept in turn)."""
    if pairs is None or pairs >= len(task.source):
        return task
    index = [round(i * (len(task.source) - 1) / max(1, pairs - 1)) for i in range(pairs)]
    pick = lambda items: tuple(items[i] for i in index)  # noqa: E731
    return replace(task, source=pick(task.source), target=pick(task.target), shapes=pick(task.shapes))


def evaluate(
    pipe,
    classifier,
    model: Model,
    task: Task,
    protocol: Protocol,
    lambdas: Sequence[float],
    fit_pairs: int | None = None,
) -> dict:
    """Fit (on ``fit_pairs`` of the pairs, default all), then score every lambda and the prompted ceiling on
    all of the task's prompts, for one model x task x protocol."""
    fit_task = fewer_pairs(task, fit_pairs)
    act_map, seconds = fit_map(pipe, model, fit_task, protocol)
    cosines = act_map.metadata.get("calibration_alignment")
    post_seconds = None
    if protocol.post is not None:
        start = time.perf_counter()
        act_map = protocol.post(pipe, model, fit_task, act_map)
        post_seconds = time.perf_counter() - start
    curve = score_curve(pipe, classifier, model, task, act_map, protocol.enable, lambdas, protocol.fused)
    return {
        **curve,
        "fit_seconds": seconds,
        "post_seconds": post_seconds,
        "fit_pairs": fit_pairs or len(task.source),
        # how well the fit's transport points where the target prompt moves the output (mean over steps of the
        # cosine the calibration records): a cheap probe of whether the hooked modules can carry the task
        "alignment": None if not cosines else float(np.mean(cosines)),
    }


def markdown(results: dict, models: Sequence[str], task_names: Sequence[str]) -> str:
    """One row per protocol: effect / shape at lambda = 1 for every model x task; pass count (cells whose
    target prompt does not move the score MIN_PROMPT_SPAN from the plain model are n/a, not counted)."""
    header = ["protocol"] + [f"{m}: {t}" for m in models for t in task_names] + ["passes"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, per_model in results.items():
        cells, passes, total = [], 0, 0
        for m in models:
            for t in task_names:
                run = per_model.get(m, {}).get(t)
                if run is None:
                    cells.append("-")
                    continue
                one = next(p for p in run["curve"] if p["lambda"] == 1.0)
                if not run.get("prompt_reaches", True):  # results of older runs lack the key: they count
                    cells.append(f"n/a (prompt {run['ceiling']:.2f})")
                    continue
                mark = "**" if run["passes"] else ""
                cells.append(f"{mark}{one['effect']:.2f} / {one['shape']:.2f}{mark}")
                passes += run["passes"]
                total += 1
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {passes}/{total} |")
    return "\n".join(lines)


def smoothness_markdown(results: dict, models: Sequence[str], task_names: Sequence[str]) -> str:
    """How gradually each cell's image changes: the pixel distance from lambda 0 at each lambda below 1, as a
    share of lambda 1's (linear: 0.25 / 0.50 / 0.75)."""
    lines = [
        "| protocol | model | task | " + "distance at lambda 0.25 / 0.5 / 0.75 (share of lambda 1's) |",
        "|---|---|---|---|",
    ]
    for name, per_model in results.items():
        for m in models:
            for t in task_names:
                run = per_model.get(m, {}).get(t)
                if run is None:
                    continue
                points = [p for p in run["curve"] if 0.0 < p["lambda"] < 1.0]
                cells = " / ".join(f"{p['distance']:.2f}" for p in points) or "-"
                lines.append(f"| {name} | {m} | {t} | {cells} |")
    return "\n".join(lines)


def alignment_markdown(results: dict, models: Sequence[str], task_names: Sequence[str]) -> str:
    """One row per protocol: the mean cosine between the transport's and the target prompt's moves of the
    output, per model x task (calibrated trajectory fits only; low where the hooked modules cannot carry the
    task, e.g. 0.42-0.47 for Qwen-Image's outline against 0.8-0.98 for the tasks that pass)."""
    header = ["protocol"] + [f"{m}: {t}" for m in models for t in task_names]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, per_model in results.items():
        cells = []
        for m in models:
            for t in task_names:
                value = per_model.get(m, {}).get(t, {}).get("alignment")
                cells.append("-" if value is None else f"{value:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def check_names(
    parser: argparse.ArgumentParser, given: Sequence[str], known: Sequence[str], what: str
) -> None:
    """Exit through ``parser`` naming the first unknown ``what`` and the choices, before anything loads."""
    unknown = [name for name in given if name not in known]
    if unknown:
        parser.error(f"unknown {what} {unknown[0]!r}; choose from {', '.join(known)}")


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m demo.protocols", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models",
        default="shipped,b,c",
        help="comma-separated: shipped, b, c, d, flux, flux-b, zimage, qwenimage (d, flux-b: held out), and any "
        "of them under another sampler: NAME@dpm2m (not zimage, qwenimage), NAME@euler_a (SDXL), NAME@to_dpm40 "
        "(SDXL: fitted with its own "
        "sampler, applied with DPM++ 2M at 40 steps), NAME@to8 (flow models: fitted at their steps, applied at 8)",
    )
    parser.add_argument("--tasks", default=",".join(tasks()))
    parser.add_argument(
        "--fit-pairs",
        type=int,
        default=None,
        help="fit on this many of the 24 prompt pairs (evenly spaced); score on all of them",
    )
    parser.add_argument("--only", default=None, help="comma-separated protocol names")
    parser.add_argument("--quick", action="store_true", help="the old and new defaults only")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "outputs" / "protocols")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--lambdas",
        default=",".join(f"{lam:g}" for lam in LAMBDAS),
        help="comma-separated strengths to score; must include 0 (the plain model) and 1 (pass/fail)",
    )
    args = parser.parse_args(argv)
    lambdas = tuple(float(x) for x in args.lambdas.split(","))
    if 0.0 not in lambdas[:1] or 1.0 not in lambdas:
        parser.error("--lambdas must start with 0 and include 1")
    if args.fit_pairs is not None and args.fit_pairs < 2:
        parser.error("--fit-pairs must be at least 2")
    torch.set_num_threads(args.threads)
    names = (
        ["new_default", "old_default"]
        if args.quick
        else (args.only.split(",") if args.only else list(PROTOCOLS))
    )
    model_names, task_names = args.models.split(","), args.tasks.split(",")
    all_tasks = tasks()
    check_names(parser, model_names, MODELS, "model")
    check_names(parser, task_names, all_tasks, "task")
    check_names(parser, names, PROTOCOLS, "protocol")
    args.output.mkdir(parents=True, exist_ok=True)
    results: dict = {name: {} for name in names}
    total, done, start = len(names) * len(model_names) * len(task_names), 0, time.perf_counter()
    for model_name in model_names:
        model = MODELS[model_name]
        pipe = load_model_pipeline(model)
        classifier = load_demo_classifier(model.classifier)
        for name in names:
            if model.family not in PROTOCOLS[name].families:
                continue
            for task_name in task_names:
                run = evaluate(
                    pipe, classifier, model, all_tasks[task_name], PROTOCOLS[name], lambdas, args.fit_pairs
                )
                results[name].setdefault(model_name, {})[task_name] = run
                done += 1
                elapsed = time.perf_counter() - start
                curve = " ".join(f"{p['effect']:.2f}/{p['shape']:.2f}" for p in run["curve"])
                print(
                    f"[{done}/{total}, {elapsed / 60:.1f} min, ETA {elapsed / done * (total - done) / 60:.0f} min] "
                    f"{model_name:7s} {task_name:18s} {name:22s} {curve}  {'PASS' if run['passes'] else 'fail'}",
                    flush=True,
                )
                (args.output / "results.json").write_text(json.dumps(results, indent=1))
    table = markdown(results, model_names, task_names)
    smooth = smoothness_markdown(results, model_names, task_names)
    aligned = alignment_markdown(results, model_names, task_names)
    (args.output / "table.md").write_text(table + "\n\n" + smooth + "\n\n" + aligned + "\n")
    print("\n" + table + "\n\n" + smooth + "\n\n" + aligned)
    return results


if __name__ == "__main__":
    main()

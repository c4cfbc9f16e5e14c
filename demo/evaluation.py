"""Sampling the demo pipeline and judging the samples with the attribute classifier."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import torch

from .classifier import AttributeClassifier, predict_proba
from .paths import DEFAULT_GUIDANCE, DEFAULT_STEPS
from .shapes import ATTRIBUTES, COLOUR_NAMES, SHAPES, STYLES, caption


def generate(
    pipe,
    prompts: list[str],
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    batch_size: int = 64,
    **kwargs,
) -> np.ndarray:
    """uint8 (N, H, W, 3) samples, image i drawn with seed `seed + i` (so results do not depend on batching).

    ``guidance`` is passed as the pipeline's CFG scale: ``guidance_scale``, or on an ACT pipeline its family's
    guidance parameter (QwenImagePipeline's ``true_cfg_scale``; its ``guidance_scale`` is for distilled models).
    """
    parameter = _guidance_parameter(pipe)
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        gens = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        images = pipe(
            chunk,
            num_inference_steps=steps,
            generator=gens,
            **{parameter: guidance},
            output_type="np",
            **kwargs,
        ).images
        out.append(np.clip(np.rint(images * 255), 0, 255).astype(np.uint8))
    return np.concatenate(out)


def _guidance_parameter(pipe) -> str:
    family = getattr(pipe, "act_family", None)
    if family is None:
        return "guidance_scale"
    from act_core.diffusers.adapter import load_adapter

    return load_adapter(family).guidance_parameter


def all_attribute_prompts(repeats: int = 1) -> tuple[list[str], dict[str, np.ndarray]]:
    """Every (shape, colour, style) caption `repeats` times, with label indices per attribute."""
    prompts: list[str] = []
    labels: dict[str, list[int]] = {k: [] for k in ATTRIBUTES}
    for shape, colour, style in itertools.product(SHAPES, COLOUR_NAMES, STYLES):
        for _ in range(repeats):
            prompts.append(caption(shape, colour, style))
            labels["shape"].append(SHAPES.index(shape))
            labels["colour"].append(COLOUR_NAMES.index(colour))
            labels["style"].append(STYLES.index(style))
    return prompts, {k: np.array(v) for k, v in labels.items()}


def sample_accuracy(
    pipe, classifier: AttributeClassifier, repeats: int = 2, seed: int = 1000, **gen_kwargs
) -> dict[str, float]:
    """Classifier accuracy per head (and all three right) on model samples for every caption."""
    prompts, labels = all_attribute_prompts(repeats)
    images = generate(pipe, prompts, seed=seed, **gen_kwargs)
    probs = predict_proba(classifier, images)
    hits = {k: probs[k].argmax(-1).numpy() == labels[k] for k in labels}
    result = {k: float(v.mean()) for k, v in hits.items()}
    result["all"] = float(np.logical_and.reduce(list(hits.values())).mean())
    result["n"] = len(prompts)
    return result


GRID_PROMPTS: tuple[str, ...] = (
    "a red circle",
    "a green square",
    "a blue triangle",
    "a yellow diamond",
    "a purple cross",
    "a orange star",
    "a green circle, outlined",
    "a purple square, outlined",
    "a red triangle, striped",
    "a blue star, striped",
    "a orange cross, dotted",
    "a yellow circle, dotted",
)


def sample_grid(
    pipe,
    path: str | Path,
    prompts=GRID_PROMPTS,
    n_seeds: int = 8,
    seed: int = 0,
    title: str = "shapes-sdxl",
    **gen_kwargs,
) -> Path:
    """A PNG with one row per prompt (label on the left) and one column per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prompts = list(prompts)
    images = generate(pipe, [p for p in prompts for _ in range(n_seeds)], seed=seed, **gen_kwargs)
    fig, axes = plt.subplots(len(prompts), n_seeds, figsize=(n_seeds * 0.9 + 2.2, len(prompts) * 0.9))
    for r, prompt in enumerate(prompts):
        for c in range(n_seeds):
            ax = axes[r, c]
            ax.imshow(images[r * n_seeds + c], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(prompt, rotation=0, ha="right", va="center", fontsize=9)
    steps, guidance = gen_kwargs.get("steps", DEFAULT_STEPS), gen_kwargs.get("guidance", DEFAULT_GUIDANCE)
    settings = f"{steps} Euler steps" + ("" if guidance is None else f", guidance {guidance}")
    fig.suptitle(f"{title} samples ({settings}, seeds {seed}..)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


__all__ = ["STYLES", "all_attribute_prompts", "generate", "sample_accuracy", "sample_grid"]

"""Do two-sided sliders steer both ways? One map per model from three prompt lists, scored at lambda -1 and +1.

    python -m demo.two_sided                        # shipped, b, flux (about 10 minutes on one core)
    python -m demo.two_sided --models shipped --pairs 8

The neutral prompts are the plain (solid) shapes; the "more" side adds ``striped``, the "less" side
``outlined`` (both styles the shapes models know). One ``fit_act(source, more, less_prompts=less)`` gives one
map; at lambda +1 the source prompts should look striped, at -1 outlined, at 0 be the model's own. ``effect``
is the share of the way to the side's own prompted ceiling (``demo.protocols.effect``); a side passes with
effect >= 0.8 and shape accuracy >= 0.85 (or within 0.1 of what the side's own prompt draws), the harness's
rule. Results: ``outputs/two_sided/table.md``.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from act_core.errors import ACTWarning

from .evaluation import generate
from .paths import REPO_ROOT, load_demo_classifier
from .protocols import (
    EVAL_SEED,
    FIT_SEED,
    MODELS,
    PASS_EFFECT,
    PASS_SHAPE,
    Task,
    check_names,
    effect,
    load_model_pipeline,
    score_images,
)
from .shapes import SHAPES, caption

COLOURS = ("red", "blue", "yellow", "orange")
SIDES = {"more": ("striped", 1.0), "less": ("outlined", -1.0)}


def side_tasks(pairs: int | None = None) -> dict[str, Task]:
    """The "more" and "less" tasks on the same neutral prompts (every shape, four colours)."""
    plain = [(s, c) for s in SHAPES for c in COLOURS]
    if pairs is not None and pairs < len(plain):
        plain = [plain[round(i * (len(plain) - 1) / max(1, pairs - 1))] for i in range(pairs)]
    source = tuple(caption(s, c, "solid") for s, c in plain)
    shapes = tuple(s for s, _ in plain)
    return {
        side: Task(
            f"two_sided_{side}", "style", style, source, tuple(caption(s, c, style) for s, c in plain), shapes
        )
        for side, (style, _) in SIDES.items()
    }


def side_passes(one: dict, ceiling_shape: float) -> bool:
    shape_ok = one["shape"] >= PASS_SHAPE or one["shape"] >= ceiling_shape - 0.1
    return one["effect"] >= PASS_EFFECT and shape_ok


def evaluate_model(name: str, pairs: int | None) -> dict:
    """Fit one two-sided map on the model and score both sides."""
    model = MODELS[name]
    pipe = load_model_pipeline(model)
    classifier = load_demo_classifier(model.classifier)
    tasks = side_tasks(pairs)
    gen = {"steps": model.steps, "guidance": model.guidance, **model.sampling}
    fit = {"num_inference_steps": model.steps, "guidance_scale": model.guidance, **model.sampling}
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ACTWarning)
        act_map = pipe.fit_act(
            list(tasks["more"].source),
            list(tasks["more"].target),
            less_prompts=list(tasks["less"].target),
            seed=FIT_SEED,
            progress=False,
            **fit,
        )
    seconds = time.perf_counter() - start
    result: dict = {"fit_seconds": seconds, "sides": {}}
    pipe.enable_act(act_map, strength=0.0)
    try:
        plain_images = generate(pipe, list(tasks["more"].source), seed=EVAL_SEED, **gen)
        for side, (_, lam) in SIDES.items():
            task = tasks[side]
            pipe.set_act_strength(0.0)
            plain = score_images(classifier, plain_images, task)
            pipe.set_act_strength(lam)
            steered = score_images(classifier, generate(pipe, list(task.source), seed=EVAL_SEED, **gen), task)
            pipe.set_act_strength(0.0)
            ceiling = score_images(classifier, generate(pipe, list(task.target), seed=EVAL_SEED, **gen), task)
            one = {
                "lambda": lam,
                **steered,
                "effect": effect(steered["score"], plain["score"], ceiling["score"]),
            }
            result["sides"][side] = {
                "plain": plain,
                "ceiling": ceiling,
                "at_lambda": one,
                "passes": side_passes(one, ceiling["shape"]),
            }
    finally:
        pipe.disable_act()
    return result


def markdown(results: dict) -> str:
    lines = [
        "| model | lambda -1 (outlined): effect / shape (prompt's shape) | lambda +1 (striped): effect / shape "
        "(prompt's shape) | fit s | passes |",
        "|---|---|---|---|---|",
    ]
    for name, run in results.items():
        cells, passes = [], 0
        for side in ("less", "more"):
            entry = run["sides"][side]
            one, mark = entry["at_lambda"], "**" if entry["passes"] else ""
            cells.append(
                f"{mark}{one['effect']:.2f} / {one['shape']:.2f}{mark} ({entry['ceiling']['shape']:.2f})"
            )
            passes += entry["passes"]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {run['fit_seconds']:.0f} | {passes}/2 |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m demo.two_sided", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="shipped,b,flux", help="comma-separated: " + ", ".join(MODELS))
    parser.add_argument("--pairs", type=int, default=None, help="neutral prompts (default: all 16)")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "outputs" / "two_sided")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    names = args.models.split(",")
    check_names(parser, names, MODELS, "model")
    if args.pairs is not None and args.pairs < 2:
        parser.error("--pairs must be at least 2")
    torch.set_num_threads(args.threads)
    args.output.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in names:
        results[name] = evaluate_model(name, args.pairs)
        sides = results[name]["sides"]
        print(
            f"{name}: less {sides['less']['at_lambda']['effect']:.2f}/{sides['less']['at_lambda']['shape']:.2f}, "
            f"more {sides['more']['at_lambda']['effect']:.2f}/{sides['more']['at_lambda']['shape']:.2f}",
            flush=True,
        )
        (args.output / "results.json").write_text(json.dumps(results, indent=1))
    table = markdown(results)
    (args.output / "table.md").write_text(table + "\n")
    print("\n" + table)
    return results


if __name__ == "__main__":
    main()

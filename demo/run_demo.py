"""The main job: ACT on the shipped shapes model, measured with the shipped attribute classifier.

It fits maps with the diffusers integration (``pipe.fit_act`` / ``enable_act``) for a style change
(solid -> striped), a colour change (green -> purple) and a concept negation (remove "striped" from
prompts that ask for it), sweeps lambda, and writes to the output folder:

* ``sweep_<experiment>.png``: labelled grids, rows = prompts, columns = lambda;
* ``curves.png``: target score and shape accuracy against lambda per method, with the score of the
  target written in the prompt as a reference line;
* ``results.json`` and the printed table.

The classifier plays the role of the paper's CLIP scores: style score = P(target style or colour),
content = shape accuracy (the shape asked for in the prompt is the one drawn).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from act_core.diffusers import act_pipeline

from .classifier import predict_proba
from .evaluation import generate
from .paths import DEFAULT_GUIDANCE, REPO_ROOT, load_demo_classifier, load_demo_pipeline
from .shapes import SHAPES, STYLES, caption

# 0..1 interpolates; above 1 extrapolates (the ComfyUI slider goes to 2).
LAMBDAS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
FIT_SEED, EVAL_SEED = 0, 10_000
DEMO_STEPS = 10


@dataclass
class Experiment:
    """Source/target prompt lists to fit on, evaluation prompts, and what counts as success."""

    name: str
    title: str
    head: str  # classifier head the target lives in ("style" or "colour")
    goal: str  # label whose probability is the score
    fit_source: list[str]
    fit_target: list[str]
    eval_prompts: list[str]  # prompts steered at every lambda
    eval_shapes: list[str]  # the shape each eval prompt asks for
    reference_prompts: list[str]  # the target written in the prompt (lambda = 0), a reference line
    lower_is_better: bool = False
    runs: dict[str, dict] = field(default_factory=dict)


def experiments(repeats: int) -> list[Experiment]:
    """The three experiments, with every shape and several colours so content has to be kept."""
    colours = ("red", "blue", "yellow", "orange")
    plain = [(s, c) for s in SHAPES for c in colours]
    style_change = Experiment(
        "style",
        "style: solid -> striped",
        "style",
        "striped",
        [caption(s, c, "solid") for s, c in plain],
        [caption(s, c, "striped") for s, c in plain],
        [caption(s, c, "solid") for s, c in plain] * repeats,
        [s for s, _ in plain] * repeats,
        [caption(s, c, "striped") for s, c in plain] * repeats,
    )
    styles = [st for st in STYLES if st != "striped"]
    per_style = [(s, st) for s in SHAPES for st in styles]
    colour_change = Experiment(
        "colour",
        "colour: green -> purple",
        "colour",
        "purple",
        [caption(s, "green", st) for s, st in per_style],
        [caption(s, "purple", st) for s, st in per_style],
        [caption(s, "green", st) for s, st in per_style] * repeats,
        [s for s, _ in per_style] * repeats,
        [caption(s, "purple", st) for s, st in per_style] * repeats,
    )
    negation = Experiment(
        "negation",
        "negation: remove 'striped' the prompt asks for",
        "style",
        "striped",
        [caption(s, c, "striped") for s, c in plain],
        [caption(s, c, "solid") for s, c in plain],
        [caption(s, c, "striped") for s, c in plain] * repeats,
        [s for s, _ in plain] * repeats,
        [caption(s, c, "solid") for s, c in plain] * repeats,
        lower_is_better=True,
    )
    return [style_change, colour_change, negation]


# (label, fit_act options). The first is the one the sweep grids show.
METHODS: dict[str, dict] = {
    "Linear-AcT (text_encoder_and_unet_norms)": {"preset": "text_encoder_and_unet_norms"},
    "Mean-AcT (text_encoder_and_unet_norms)": {"preset": "text_encoder_and_unet_norms", "method": "mean"},
    "Linear-AcT (unet_norms, paper)": {"preset": "unet_norms"},
    "Mean-AcT (unet_norms)": {"preset": "unet_norms", "method": "mean"},
    "Linear-AcT (text_encoder_norms, unbounded)": {"preset": "text_encoder_norms", "support": "unbounded"},
}


def evaluate(
    pipe, classifier, experiment: Experiment, prompts: Sequence[str], seed: int, **gen
) -> dict[str, float]:
    """Mean target probability and shape accuracy of images generated for ``prompts``."""
    images = generate(pipe, list(prompts), seed=seed, **gen)
    probs = predict_proba(classifier, images)
    goal = probs[experiment.head][:, classifier.labels[experiment.head].index(experiment.goal)]
    shape_index = torch.tensor([classifier.labels["shape"].index(s) for s in experiment.eval_shapes])
    shape_ok = probs["shape"].argmax(-1) == shape_index[: len(images)]
    return {"score": float(goal.mean()), "shape_accuracy": float(shape_ok.float().mean())}


def run_experiment(
    pipe, classifier, experiment: Experiment, methods: dict[str, dict], lambdas, gen: dict
) -> None:
    """Fit each method, sweep lambda on the evaluation prompts, fill ``experiment.runs``."""
    reference = evaluate(pipe, classifier, experiment, experiment.reference_prompts, EVAL_SEED, **gen)
    experiment.runs["reference"] = reference
    # A minute per experiment: one bar step per fit and per lambda, so the job never looks stuck.
    bar = tqdm(total=len(methods) * (1 + len(lambdas)), desc=experiment.name, unit="step", leave=False)
    for label, options in methods.items():
        bar.set_postfix_str(f"fit {label}")
        start = time.perf_counter()
        act_map = pipe.fit_act(
            experiment.fit_source, experiment.fit_target, seed=FIT_SEED, progress=False, **options
        )
        fit_seconds = time.perf_counter() - start
        bar.update()
        curve = []
        pipe.enable_act(act_map, strength=0.0)
        for lam in lambdas:
            bar.set_postfix_str(f"{label} lambda={lam:g}")
            pipe.set_act_strength(lam)
            curve.append(
                {
                    "lambda": lam,
                    **evaluate(pipe, classifier, experiment, experiment.eval_prompts, EVAL_SEED, **gen),
                }
            )
            bar.update()
        pipe.disable_act()
        experiment.runs[label] = {
            "fit_seconds": fit_seconds,
            "modules": len(act_map),
            "curve": curve,
            "map": act_map,
        }
    bar.close()


def print_table(experiment: Experiment, lambdas) -> str:
    """The score/accuracy table of one experiment, as printed and stored in results."""
    goal = f"P({experiment.goal})"
    lines = [
        f"\n{experiment.title}  ({goal} and shape accuracy; {goal} with the target in the prompt: "
        f"{experiment.runs['reference']['score']:.3f})"
    ]
    header = f"{'method':44s}" + "".join(f"  lam={lam:<4g}" for lam in lambdas) + "   fit s"
    lines.append(header)
    for label, run in experiment.runs.items():
        if label == "reference":
            continue
        scores = "".join(f"  {p['score']:.2f}/{p['shape_accuracy']:.2f}" for p in run["curve"])
        lines.append(f"{label:44s}{scores}   {run['fit_seconds']:.1f}")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def plot_curves(experiments_done: list[Experiment], path: Path) -> None:
    """One column per experiment: target score (top) and shape accuracy (bottom) against lambda."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        2, len(experiments_done), figsize=(4.2 * len(experiments_done), 6.4), squeeze=False
    )
    for column, experiment in enumerate(experiments_done):
        top, bottom = axes[0, column], axes[1, column]
        for label, run in experiment.runs.items():
            if label == "reference":
                continue
            lam = [p["lambda"] for p in run["curve"]]
            top.plot(lam, [p["score"] for p in run["curve"]], marker="o", label=label)
            bottom.plot(lam, [p["shape_accuracy"] for p in run["curve"]], marker="o", label=label)
        top.axhline(
            experiment.runs["reference"]["score"], color="gray", linestyle="--", label="target in the prompt"
        )
        top.set_title(experiment.title, fontsize=9)
        top.set_ylabel(f"P({experiment.goal})")
        bottom.set_ylabel("shape accuracy")
        bottom.set_xlabel("lambda")
        for axis in (top, bottom):
            axis.set_ylim(-0.02, 1.02)
            axis.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_sweeps(pipe, experiment: Experiment, lambdas, out: Path, gen: dict, rows: int = 4) -> Path:
    """A grid for the paper's preset: a few evaluation prompts (rows) at every lambda (columns)."""
    from act_core.diffusers.sweep import save_grid, sweep_grid

    act_map = experiment.runs[next(iter(METHODS))]["map"]
    step = max(1, len(experiment.fit_source) // rows)
    prompts = experiment.eval_prompts[: len(experiment.fit_source) : step][:rows]
    grid = sweep_grid(
        pipe,
        act_map,
        prompts,
        lambdas,
        seed=EVAL_SEED,
        num_inference_steps=gen["steps"],
        guidance_scale=gen["guidance"],
    )
    info = {"experiment": experiment.title, "lambdas": list(lambdas), "seed": EVAL_SEED, **gen}
    return save_grid(grid, out / f"sweep_{experiment.name}.png", info)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "outputs" / "demo", help="output folder")
    parser.add_argument(
        "--repeats", type=int, default=1, help="evaluation images per prompt (different seeds)"
    )
    # 10 steps: classifier accuracy on samples is within 0.5% of 20 steps (docs/demo_model.md), at half the time.
    parser.add_argument("--steps", type=int, default=DEMO_STEPS)
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    parser.add_argument("--quick", action="store_true", help="one method, one experiment (a smoke run)")
    args = parser.parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    pipe = act_pipeline(load_demo_pipeline())
    classifier = load_demo_classifier()
    gen = {"steps": args.steps, "guidance": args.guidance}
    methods = {k: METHODS[k] for k in list(METHODS)[:1]} if args.quick else METHODS
    todo = experiments(args.repeats)[:1] if args.quick else experiments(args.repeats)
    tables = []
    for experiment in todo:
        run_experiment(pipe, classifier, experiment, methods, LAMBDAS, gen)
        tables.append(print_table(experiment, LAMBDAS))
        print(f"  wrote {write_sweeps(pipe, experiment, LAMBDAS, args.output, gen)}", flush=True)
    plot_curves(todo, args.output / "curves.png")
    results = {
        e.name: {
            "title": e.title,
            "goal": e.goal,
            "reference": e.runs["reference"],
            "runs": {
                k: {kk: vv for kk, vv in v.items() if kk != "map"}
                for k, v in e.runs.items()
                if k != "reference"
            },
        }
        for e in todo
    }
    results["settings"] = {
        "lambdas": LAMBDAS,
        "fit_seed": FIT_SEED,
        "eval_seed": EVAL_SEED,
        **gen,
        "repeats": args.repeats,
    }
    results["seconds"] = time.perf_counter() - start
    (args.output / "results.json").write_text(json.dumps(results, indent=2))
    (args.output / "table.txt").write_text("\n".join(tables) + "\n")
    print(f"\nwrote {args.output / 'curves.png'}, results.json, table.txt in {results['seconds']:.0f} s")
    return results


if __name__ == "__main__":
    main()

"""The main job: ACT on the shipped shapes models, old and new protocols side by side.

For each model (default: ``shapes-sdxl``, 20 Euler steps at guidance 3; ``shapes-sdxl-b``, trained
independently here, 25 steps at guidance 4; ``shapes-flux``, the FLUX.1-architecture model, 20 steps, no
CFG; ``shapes-flux-b``, a second FLUX model trained independently, 25 steps; ``shapes-zimage`` and
``shapes-qwenimage``, the Z-Image- and Qwen-Image-architecture models, 20 steps with CFG; and two sampler
transfers: the shipped SDXL fitted with its Euler sampler and applied with DPM++ 2M at 40 steps, the shipped
FLUX fitted at 20 steps and applied at 8) and each task (style solid -> striped, solid -> outlined, colour green ->
purple, colour red -> yellow, negation: remove the "striped" the prompt asks for), a map is fitted with ``pipe.fit_act`` for each protocol of the model's
family (SDXL: the default, the paper's first-step protocol, text encoders only; FLUX: the default
``pooled_text_and_blocks``, the reference's ``transformer_blocks``, text encoders only; Z-Image and
Qwen-Image: their defaults, ``caption_stream`` and ``transformer_blocks``), applied with ``pipe.enable_act`` at
lambda 0 ... 2, and the model's attribute classifier scores the images (the role the paper gives CLIP
scores). Writes to the output folder:

* ``table.md`` and ``results.json``: effect (the share of the way from lambda 0 to the target written
  in the prompt) and shape accuracy per lambda;
* ``sweep_<model>_<task>.png``: labelled grids of the default protocol, rows = prompts, columns = lambda;
* ``curves.png``: effect and shape accuracy against lambda.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from act_core.progress import Progress

from .paths import REPO_ROOT, load_demo_classifier
from .protocols import (
    EVAL_SEED,
    MODELS,
    PROTOCOLS,
    fit_map,
    generation_settings,
    load_model_pipeline,
    score_curve,
    tasks,
    use_scheduler,
)

LAMBDAS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
MAIN_PROTOCOLS = {  # per model family; the first is the default, whose sweep grids are written
    "sdxl": ("new_default", "old_default", "text_encoder_norms"),
    "flux": ("new_default", "flux_blocks", "flux_text_encoders"),
    # one row each: the family's default (the protocol study of docs/demo_model.md compares the others)
    "zimage": ("new_default",),
    "qwenimage": ("new_default",),
}
# The shipped models (one per family at least), and a sampler transfer on SDXL and FLUX: a map fitted with the
# model's own sampler, applied with another (SDXL: DPM++ 2M at 40 steps; FLUX: 8 steps).
MAIN_MODELS = ("shipped", "b", "flux", "flux-b", "zimage", "qwenimage", "shipped@to_dpm40", "flux@to8")
MAIN_TASKS = ("style", "outline", "colour", "colour_red_yellow", "negation")
GRID_ROWS = 4


def table(results: dict, lambdas: Sequence[float]) -> str:
    """Markdown: one block per model and task, one row per protocol, effect / shape per lambda."""
    lines = []
    for model_name, per_task in results.items():
        model = MODELS[model_name]
        applied = f", applied at {model.apply_steps} steps" if model.apply_steps else ""
        applied += f" with {model.apply_scheduler[0]}" if model.apply_scheduler else ""
        lines.append(f"\n### {model_name} ({model.steps} steps, guidance {model.guidance:g}{applied})\n")
        header = ["task", "protocol", *[f"lambda {lam:g}" for lam in lambdas], "fit s"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for task_name, per_protocol in per_task.items():
            for name, run in per_protocol.items():
                cells = [f"{p['effect']:.2f} / {p['shape']:.2f}" for p in run["curve"]]
                mark = " (pass)" if run["passes"] else ""
                lines.append(
                    f"| {task_name} | {name}{mark} | " + " | ".join(cells) + f" | {run['fit_seconds']:.1f} |"
                )
    return "\n".join(lines)


def plot_curves(results: dict, path: Path) -> None:
    """Effect (top) and shape accuracy (bottom) against lambda, one column per model x task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [(m, t) for m, per_task in results.items() for t in per_task]
    fig, axes = plt.subplots(2, len(columns), figsize=(3.2 * len(columns), 5.6), squeeze=False)
    for column, (model_name, task_name) in enumerate(columns):
        top, bottom = axes[0, column], axes[1, column]
        for name, run in results[model_name][task_name].items():
            lam = [p["lambda"] for p in run["curve"]]
            top.plot(lam, [p["effect"] for p in run["curve"]], marker="o", label=name)
            bottom.plot(lam, [p["shape"] for p in run["curve"]], marker="o", label=name)
        top.axhline(1.0, color="gray", linestyle="--", linewidth=0.8)
        top.set_title(f"{model_name}: {task_name}", fontsize=9)
        top.set_ylim(-0.1, 1.2)
        bottom.set_ylim(-0.02, 1.02)
        bottom.set_xlabel("lambda")
        for axis in (top, bottom):
            axis.grid(alpha=0.3)
    axes[0, 0].set_ylabel("effect (1 = as if prompted)")
    axes[1, 0].set_ylabel("shape accuracy")
    axes[0, 0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_sweep(pipe, act_map, model, task, lambdas, out: Path) -> Path:
    """A grid of the default protocol: a few source prompts (rows) at every lambda (columns)."""
    from act_core.diffusers.adapter import load_adapter
    from act_core.diffusers.sweep import save_grid, sweep_grid

    step = max(1, len(task.source) // GRID_ROWS)
    prompts = list(task.source[::step][:GRID_ROWS])
    gen, scheduler = generation_settings(model)
    # the CFG scale under the family's own name (QwenImagePipeline: true_cfg_scale), as generate() passes it
    guidance = load_adapter(pipe.act_family).guidance_parameter
    use_scheduler(pipe, scheduler)
    try:
        grid = sweep_grid(
            pipe,
            act_map,
            prompts,
            lambdas,
            seed=EVAL_SEED,
            num_inference_steps=gen.pop("steps"),
            **{guidance: gen.pop("guidance")},
            **gen,
        )
    finally:
        use_scheduler(pipe, model.scheduler)
    info = {"model": model.name, "task": task.name, "lambdas": list(lambdas), "seed": EVAL_SEED}
    return save_grid(grid, out / f"sweep_{model.name}_{task.name}.png", info)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "outputs" / "demo", help="output folder")
    parser.add_argument(
        "--models",
        default=",".join(MAIN_MODELS),
        help=f"comma-separated, of {', '.join(MODELS)} (default {','.join(MAIN_MODELS)}; c and d: the protocol "
        "study's other models)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="the shipped model, style only, the default only"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU threads (1 is fastest for these tiny models; more thrash)"
    )
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    torch.set_num_threads(args.threads)
    args.output.mkdir(parents=True, exist_ok=True)
    model_names = ["shipped"] if args.quick else args.models.split(",")
    unknown = [m for m in model_names if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    all_tasks = tasks()
    task_names = ["style"] if args.quick else list(MAIN_TASKS)

    def protocols_of(model_name: str) -> list[str]:
        if args.quick or "@" in model_name:  # other samplers: the default only
            return ["new_default"]
        return list(MAIN_PROTOCOLS[MODELS[model_name].family])

    # one unit of work per fit + lambda, and per sweep-grid cell
    units = sum(
        len(task_names) * (len(protocols_of(m)) * (1 + len(LAMBDAS)) + GRID_ROWS * len(LAMBDAS))
        for m in model_names
    )
    progress, done = Progress("main job", interval=10.0), 0
    start = time.perf_counter()
    results: dict = {}
    for model_name in model_names:
        model = MODELS[model_name]
        pipe = load_model_pipeline(model)
        classifier = load_demo_classifier(model.classifier)
        for task_name in task_names:
            task = all_tasks[task_name]
            for name in protocols_of(model_name):
                protocol = PROTOCOLS[name]
                progress(done, units, f"{model_name} {task_name}: fit {name}")
                act_map, seconds = fit_map(pipe, model, task, protocol)
                done += 1
                progress(done, units, f"{model_name} {task_name}: {name} lambda sweep")
                run = score_curve(pipe, classifier, model, task, act_map, protocol.enable, LAMBDAS)
                done += len(LAMBDAS)
                results.setdefault(model_name, {}).setdefault(task_name, {})[name] = {
                    **run,
                    "fit_seconds": seconds,
                }
                if name == "new_default":
                    progress(done, units, f"{model_name} {task_name}: sweep grid")
                    write_sweep(pipe, act_map, model, task, LAMBDAS, args.output)
                    done += GRID_ROWS * len(LAMBDAS)
                (args.output / "results.json").write_text(json.dumps(results, indent=1))
    progress(units, units, "done")
    text = table(results, LAMBDAS)
    print(text, flush=True)
    plot_curves(results, args.output / "curves.png")
    seconds = time.perf_counter() - start
    summary = {
        "results": results,
        "settings": {"lambdas": LAMBDAS, "threads": args.threads, "eval_seed": EVAL_SEED},
        "seconds": seconds,
    }
    (args.output / "results.json").write_text(json.dumps(summary, indent=1))
    (args.output / "table.md").write_text(text + "\n")
    print(f"\nwrote {args.output}/table.md, results.json, curves.png and the sweep grids in {seconds:.0f} s")
    return summary


if __name__ == "__main__":
    main()

"""What fitting costs: the default (trajectory) protocol against the paper's first-step protocol.

    python benchmarks/bench_fit.py            # both shipped models, 24 + 24 prompts, 3 rounds (a few minutes)

At equal prompts, each fit is timed (median of interleaved rounds, one thread) together with the UNet
calls it makes and the UNet rows (samples) those calls process; the unit for scale is one plain
generation of the 24 source prompts with the same sampling settings (CFG doubles its rows). The
estimation columns are the seconds spent in ``ModuleEstimator`` (every module's map, every step) and their
share of the fit; the rest is the UNet and its hooks.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

import act_core.estimators as estimators

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tables import table  # noqa: E402

from act_core.diffusers import act_pipeline  # noqa: E402
from act_core.errors import ACTWarning  # noqa: E402
from demo.evaluation import generate  # noqa: E402
from demo.paths import load_demo_pipeline  # noqa: E402
from demo.protocols import MODELS, tasks  # noqa: E402


class UNetCounter:
    """Counts UNet calls and the rows (samples) they process."""

    def __init__(self, unet):
        self.unet, self.calls, self.rows = unet, 0, 0

    def __enter__(self):
        def count(module, args, kwargs):
            self.calls += 1
            sample = args[0] if args else kwargs["sample"]
            self.rows += sample.shape[0]

        self.handle = self.unet.register_forward_pre_hook(count, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


class EstimationTimer:
    """Seconds spent in ``ModuleEstimator`` calls (both fitting engines call it once per module and step)."""

    def __init__(self):
        self.seconds = 0.0

    def __enter__(self):
        self.original = original = estimators.ModuleEstimator.__call__

        def timed(estimator, *args, **kwargs):
            start = time.perf_counter()
            try:
                return original(estimator, *args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        estimators.ModuleEstimator.__call__ = timed
        return self

    def __exit__(self, *exc):
        estimators.ModuleEstimator.__call__ = self.original


def variants_for(pipe, model, task) -> dict:
    """What is timed on one model: a plain generation (the unit) and the two fits."""
    sampling = {"num_inference_steps": model.steps, "guidance_scale": model.guidance}
    source, target = list(task.source), list(task.target)
    return {
        "generate the 24 source prompts": lambda: generate(
            pipe, source, seed=0, steps=model.steps, guidance=model.guidance
        ),
        "fit: default (unet_norms, trajectory)": lambda: pipe.fit_act(
            source, target, progress=False, **sampling
        ),
        "fit: paper (unet_norms_first_step)": lambda: pipe.fit_act(
            source, target, preset="unet_norms_first_step", progress=False, **sampling
        ),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", default="shipped,b")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    task = tasks()["style"]
    rows = []
    for model_name in args.models.split(","):
        model = MODELS[model_name]
        pipe = act_pipeline(load_demo_pipeline(path=model.path))
        variants = variants_for(pipe, model, task)
        seconds = {name: [] for name in variants}
        estimation = {name: [] for name in variants}
        counts = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ACTWarning)
            for round_index in range(args.rounds):
                names = list(variants)
                names = names[round_index % len(names) :] + names[: round_index % len(names)]
                for name in names:
                    with UNetCounter(pipe.unet) as counter, EstimationTimer() as timer:
                        start = time.perf_counter()
                        variants[name]()
                        seconds[name].append(time.perf_counter() - start)
                    estimation[name].append(timer.seconds)
                    counts[name] = (counter.calls, counter.rows)
        unit = statistics.median(seconds["generate the 24 source prompts"])
        for name in variants:
            median = statistics.median(seconds[name])
            calls, samples = counts[name]
            estimated = statistics.median(estimation[name])
            rows.append(
                [
                    model_name,
                    name,
                    f"{median:.2f}",
                    f"{median / unit:.2f}",
                    f"{estimated:.2f}",
                    f"{100 * estimated / median:.1f}%",
                    str(calls),
                    str(samples),
                ]
            )
    table(
        f"fit cost, 24 + 24 prompts (median of {args.rounds} interleaved rounds, 1 thread); "
        "x gen = seconds / one plain generation of the source prompts",
        ["model", "what", "seconds", "x gen", "estimation s", "estimation share", "UNet calls", "UNet rows"],
        rows,
    )


if __name__ == "__main__":
    main()

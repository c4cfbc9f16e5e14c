"""What fitting costs: the default (trajectory) protocol against a plain generation of the same prompts at equal
steps, and against the paper's first-step protocol.

    python benchmarks/bench_fit.py                                   # SDXL shipped + b, 24 + 24 prompts, 3 rounds
    python benchmarks/bench_fit.py --models shipped,b,flux,zimage,qwenimage   # every family with a shipped model

At equal prompts, each fit is timed (median of interleaved rounds, one thread) together with the denoiser
calls it makes and the denoiser rows (samples) those calls process; the unit for scale is one plain
generation of the 24 source prompts with the same sampling settings (CFG doubles its rows). A fit's time is
split three ways: denoiser (wall time while a denoiser forward runs, ACT's hooks included, estimation inside
it excluded), estimation (``ModuleEstimator`` calls: every module's map, every step) and other (text
encoders, the scheduler, calibration, the VAE of a generation, Python). The paper's protocol is timed on
families that have it (SDXL).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

import act_core.estimators as estimators

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tables import table  # noqa: E402

from act_core.errors import ACTWarning  # noqa: E402
from act_core.families import FAMILIES  # noqa: E402
from demo.evaluation import generate  # noqa: E402
from demo.protocols import MODELS, load_model_pipeline, tasks  # noqa: E402

GENERATE = "generate the 24 source prompts"


class DenoiserCounter:
    """Counts denoiser calls, the rows (samples) they process, and the wall time while any forward runs (calls
    that run together in threads overlap: their union is counted once)."""

    def __init__(self, denoiser):
        self.denoiser, self.calls, self.rows, self.seconds = denoiser, 0, 0, 0.0
        self.active, self.since, self.lock = 0, 0.0, threading.Lock()

    def __enter__(self):
        def enter(module, args, kwargs):
            sample = args[0] if args else next(iter(kwargs.values()))  # sample / hidden_states / x
            with self.lock:
                self.calls += 1
                self.rows += len(sample) if isinstance(sample, list) else sample.shape[0]
                if self.active == 0:
                    self.since = time.perf_counter()
                self.active += 1

        def leave(module, args, kwargs, output):
            with self.lock:
                self.active -= 1
                if self.active == 0:
                    self.seconds += time.perf_counter() - self.since

        self.handles = [
            self.denoiser.register_forward_pre_hook(enter, with_kwargs=True),
            self.denoiser.register_forward_hook(leave, with_kwargs=True, always_call=True),
        ]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


class EstimationTimer:
    """Seconds spent in ``ModuleEstimator`` calls (both fitting engines call it once per module and step), and
    the part of them spent while a denoiser forward ran (the trajectory fit estimates inside the forward)."""

    def __init__(self, denoiser: DenoiserCounter):
        self.seconds, self.inside, self.denoiser = 0.0, 0.0, denoiser

    def __enter__(self):
        self.original = original = estimators.ModuleEstimator.__call__

        def timed(estimator, *args, **kwargs):
            start = time.perf_counter()
            try:
                return original(estimator, *args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                self.seconds += elapsed
                if self.denoiser.active:
                    self.inside += elapsed

        estimators.ModuleEstimator.__call__ = timed
        return self

    def __exit__(self, *exc):
        estimators.ModuleEstimator.__call__ = self.original


def variants_for(pipe, model, task) -> dict:
    """What is timed on one model: a plain generation (the unit), the default fit and, where the family has
    it, the paper's first-step fit; all with the model's sampling settings."""
    family = FAMILIES[model.family]
    sampling = {"num_inference_steps": model.steps, "guidance_scale": model.guidance, **model.sampling}
    source, target = list(task.source), list(task.target)
    variants = {
        GENERATE: lambda: generate(
            pipe, source, seed=0, steps=model.steps, guidance=model.guidance, **model.sampling
        ),
        f"fit: default ({family.default_preset}, trajectory)": lambda: pipe.fit_act(
            source, target, progress=False, **sampling
        ),
    }
    if "unet_norms_first_step" in family.presets:
        variants["fit: paper (unet_norms_first_step)"] = lambda: pipe.fit_act(
            source, target, preset="unet_norms_first_step", progress=False, **sampling
        )
    return variants


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
        pipe = load_model_pipeline(model)
        denoiser = getattr(pipe, FAMILIES[model.family].denoiser)
        variants = variants_for(pipe, model, task)
        # per variant: [total, denoiser, estimation] seconds of each round
        seconds = {name: [] for name in variants}
        counts = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ACTWarning)
            for round_index in range(args.rounds):
                names = list(variants)
                names = names[round_index % len(names) :] + names[: round_index % len(names)]
                for name in names:
                    with DenoiserCounter(denoiser) as counter, EstimationTimer(counter) as timer:
                        start = time.perf_counter()
                        variants[name]()
                        total = time.perf_counter() - start
                    seconds[name].append((total, counter.seconds - timer.inside, timer.seconds))
                    counts[name] = (counter.calls, counter.rows)
        unit = statistics.median(total for total, _, _ in seconds[GENERATE])
        for name in variants:
            total, in_denoiser, estimated = (
                statistics.median(column) for column in zip(*seconds[name], strict=True)
            )
            calls, samples = counts[name]
            rows.append(
                [
                    model_name,
                    name,
                    f"{total:.2f}",
                    f"{total / unit:.2f}",
                    f"{in_denoiser:.2f}",
                    f"{estimated:.2f}",
                    f"{total - in_denoiser - estimated:.2f}",
                    f"{100 * estimated / total:.1f}%",
                    str(calls),
                    str(samples),
                ]
            )
    table(
        f"fit cost, 24 + 24 prompts (median of {args.rounds} interleaved rounds, 1 thread); "
        "x gen = seconds / one plain generation of the source prompts; seconds = denoiser + estimation + other "
        "(medians of each, so the parts need not add up exactly)",
        [
            "model",
            "what",
            "seconds",
            "x gen",
            "denoiser s",
            "estimation s",
            "other s",
            "estimation share",
            "denoiser calls",
            "denoiser rows",
        ],
        rows,
    )


if __name__ == "__main__":
    main()

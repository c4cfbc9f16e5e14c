"""Does pooling fit statistics over every denoising step rescue the paper's ``unet_norms`` preset?

On the shipped demo model the paper's protocol (statistics from the first denoising step only) does not
steer at all (docs/demo_results.md). This runs the main job's three experiments with the UNet presets
fitted on statistics from all 10 sampling steps (``fit_act(..., statistics_steps=10)``) and prints the
same tables. About 8 minutes on 2 CPU cores (each fit runs 10 UNet steps per batch).

    python scripts/explore_statistics_steps.py [--experiments style negation]
"""

from __future__ import annotations

import argparse
import time

from act_core.diffusers.pipeline import act_pipeline
from demo import run_demo
from demo.paths import load_demo_classifier, load_demo_pipeline

ALL_STEPS = {"statistics_steps": run_demo.DEMO_STEPS, "num_inference_steps": run_demo.DEMO_STEPS}
METHODS: dict[str, dict] = {
    "Linear unet_norms, stats 10 steps": {"preset": "unet_norms", **ALL_STEPS},
    "Linear unet_norms unbounded, stats 10 steps": {
        "preset": "unet_norms",
        "support": "unbounded",
        **ALL_STEPS,
    },
    "Mean unet_norms, stats 10 steps": {"preset": "unet_norms", "method": "mean", **ALL_STEPS},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    names = [e.name for e in run_demo.experiments(1)]
    parser.add_argument("--experiments", nargs="+", choices=names, default=names)
    args = parser.parse_args()
    pipe = act_pipeline(load_demo_pipeline())
    classifier = load_demo_classifier()
    gen = {"steps": run_demo.DEMO_STEPS, "guidance": run_demo.DEFAULT_GUIDANCE}
    start = time.perf_counter()
    for experiment in run_demo.experiments(1):
        if experiment.name in args.experiments:
            run_demo.run_experiment(pipe, classifier, experiment, METHODS, run_demo.LAMBDAS, gen)
            run_demo.print_table(experiment, run_demo.LAMBDAS)
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()

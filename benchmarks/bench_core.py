"""Core engine benchmark: estimation cost, hook/fold overhead, causal vs at-once fitting cost.

Run: python benchmarks/bench_core.py [--quick]
Prints three tables. Times are medians of repeated runs; ratios are measured side by side in one run
(the variants are interleaved, so machine noise hits them alike).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from tables import table
from torch import nn

from act_core import apply_act, fit_with_stats, fold_act, linear_act, select_modules
from act_core.estimators import gaussian_act, mean_act
from act_core.maps import ACTMap, ModuleMap


def median_seconds(function: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_estimation(quick: bool) -> None:
    rows = []
    sizes = [(64, 1280), (256, 1280), (1024, 1280), (1024, 10240)] if not quick else [(64, 1280), (256, 1280)]
    for n, d in sizes:
        source, target = torch.randn(n, d), torch.randn(n, d) * 2 + 1
        cells = [str(n), str(d)]
        for estimator in (linear_act, mean_act, gaussian_act):
            cells.append(f"{1000 * median_seconds(lambda e=estimator, s=source, t=target: e(s, t), 5):.1f}")
        rows.append(cells)
    table("Estimation time per module (ms, median of 5)", ["N", "D", "linear", "mean", "gaussian"], rows)


class TransformerWidthStack(nn.Module):
    """LayerNorm -> Linear(4D) -> GELU -> Linear(D) blocks at SDXL transformer width."""

    def __init__(self, width: int, depth: int):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
            )
            for _ in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return x


def bench_overhead(quick: bool) -> None:
    width, depth, tokens = 1280, 4 if quick else 8, 256 if quick else 1024
    model = TransformerWidthStack(width, depth).eval()
    modules = select_modules(model, ["*.0"], types=(nn.LayerNorm,))
    ones = torch.ones(width)
    unbounded = ACTMap(
        {
            n: ModuleMap(
                1 + 0.1 * torch.rand(width),
                0.1 * torch.randn(width),
                -ones * float("inf"),
                ones * float("inf"),
            )
            for n in modules
        }
    )
    bounded = ACTMap(
        {n: ModuleMap(m.omega, m.beta, -3 * ones, 3 * ones) for n, m in unbounded.modules.items()}
    )
    x = torch.randn(1, tokens, width)
    variants: dict[str, list[float]] = {
        "no ACT": [],
        "hooks (unbounded)": [],
        "hooks (range support)": [],
        "folded": [],
    }
    repeats = 5 if quick else 15
    with torch.no_grad():
        model(x)  # warm-up
        for _ in range(repeats):
            variants["no ACT"].append(median_seconds(lambda: model(x), 1))
            handle = apply_act(modules, unbounded)
            variants["hooks (unbounded)"].append(median_seconds(lambda: model(x), 1))
            handle.remove()
            handle = apply_act(modules, bounded)
            variants["hooks (range support)"].append(median_seconds(lambda: model(x), 1))
            handle.remove()
            folded = fold_act(modules, unbounded)
            variants["folded"].append(median_seconds(lambda: model(x), 1))
            folded.unfold()
    base = statistics.median(variants["no ACT"])
    rows = [
        [name, f"{1000 * statistics.median(t):.1f}", f"{statistics.median(t) / base:.3f}"]
        for name, t in variants.items()
    ]
    table(
        f"Forward time, {depth} blocks of width {width}, {tokens} tokens, {depth} hooked LayerNorms (median of {repeats}, interleaved)",
        ["variant", "ms", "ratio to no ACT"],
        rows,
    )


def bench_fitting(quick: bool) -> None:
    width, depth = 256, 8 if quick else 16
    torch.manual_seed(0)
    model = nn.Sequential(
        *[nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width), nn.GELU()) for _ in range(depth)]
    )
    modules = select_modules(model, types=(nn.LayerNorm,))
    batches = 4
    source = [torch.randn(32, 128, width) for _ in range(batches)]
    target = [torch.randn(32, 128, width) * 1.3 + 0.5 for _ in range(batches)]
    rows = []
    runs = [
        ("at-once", {"mode": "at_once"}),
        ("causal lockstep (exact)", {"mode": "causal", "causal_strategy": "lockstep"}),
        ("causal groupwise, 4 groups", {"mode": "causal", "causal_strategy": "groupwise", "num_groups": 4}),
        (
            f"causal, 1 module/pass (reference, {depth} passes)",
            {"mode": "causal", "causal_strategy": "groupwise", "num_groups": depth},
        ),
    ]
    results = {}
    for name, options in runs:
        times, calls = [], 0
        for _ in range(3):
            start = time.perf_counter()
            _, stats = fit_with_stats(model, source, target, modules, **options)
            times.append(time.perf_counter() - start)
            calls = stats.run_model_calls
        results[name] = (statistics.median(times), calls)
    base = results["at-once"][0]
    for name, (seconds, calls) in results.items():
        rows.append([name, str(calls), f"{seconds:.2f}", f"{seconds / base:.2f}"])
    table(
        f"Fitting cost, {depth} LayerNorms of width {width}, {batches}+{batches} batches of 32x128 tokens (median of 3)",
        ["mode", "run_model calls", "seconds", "ratio to at-once"],
        rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    bench_estimation(args.quick)
    bench_overhead(args.quick)
    bench_fitting(args.quick)


if __name__ == "__main__":
    main()

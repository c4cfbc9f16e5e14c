"""Small models shared by the core tests (plain torch, random weights, nothing downloaded)."""

from __future__ import annotations

import torch
from torch import nn

from act_core.maps import ACTMap, ModuleMap


class Block(nn.Module):
    """Linear -> LayerNorm -> GELU, with non-trivial LayerNorm affine parameters."""

    def __init__(self, width: int):
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.uniform_(-0.3, 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(self.norm(self.linear(x)))


class Stack(nn.Module):
    """A stack of blocks: maps fitted upstream shift the statistics downstream."""

    def __init__(self, width: int = 16, depth: int = 4, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.blocks = nn.ModuleList([Block(width) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class ConvNet(nn.Module):
    """Conv -> GroupNorm -> SiLU twice: 4-D (B, C, H, W) outputs, like UNet ResNet blocks."""

    def __init__(self, channels: int = 8, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1)
        self.norm1 = nn.GroupNorm(2, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(2, channels)
        with torch.no_grad():
            for norm in (self.norm1, self.norm2):
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.uniform_(-0.3, 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.silu(self.norm1(self.conv1(x)))
        return self.norm2(self.conv2(x))


def random_map(
    widths: dict[str, int], seed: int = 0, bounded: bool = False, apply_mode: str = "per_element"
) -> ACTMap:
    """An ACTMap with random (but sane) parameters, for tests that do not need a fit."""
    generator = torch.Generator().manual_seed(seed)
    modules = {}
    for name, width in widths.items():
        omega = 1 + 0.5 * torch.rand(width, generator=generator)
        beta = torch.randn(width, generator=generator) * 0.3
        if bounded:
            low, high = -torch.rand(width, generator=generator), torch.rand(width, generator=generator)
        else:
            low, high = torch.full((width,), -float("inf")), torch.full((width,), float("inf"))
        modules[name] = ModuleMap(omega, beta, low, high, apply_mode=apply_mode)
    return ACTMap(modules, {"method": "linear", "model": "test"})


def w1(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over units of the 1-D Wasserstein-1 distance between equal-size samples (N, D)."""
    return (torch.sort(a, dim=0).values - torch.sort(b, dim=0).values).abs().mean().item()


def record_scale_steps(monkeypatch) -> list[tuple[float, float]]:
    """Every (noise level, gain) that ``TrajectoryFit.scale_step`` receives while the test runs."""
    from act_core.trajectory import TrajectoryFit

    calls: list[tuple[float, float]] = []
    original = TrajectoryFit.scale_step

    def spy(self, level, gain):
        calls.append((float(level), float(gain)))
        return original(self, level, gain)

    monkeypatch.setattr(TrajectoryFit, "scale_step", spy)
    return calls

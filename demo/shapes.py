"""Procedural coloured shapes: the data the shipped demo model and its classifier are trained on.

Every image is one shape with three independent attributes (shape, colour, style) on a plain light
background, with bounded jitter in position, size, rotation and tint. Everything is drawn from a
`numpy.random.Generator`, so a seed reproduces the data exactly; pure numpy + PIL, no torch.

Caption grammar (one rule, used for training and by the demo): ``"a {colour} {shape}"`` followed by
``", {style}"``. The style is always named unless it is the default ``"solid"``, which is named only
when ``explicit_style`` is true (training names it some of the time, so both forms mean solid).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "star")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "green": (34, 160, 60),
    "blue": (31, 80, 214),
    "yellow": (236, 196, 20),
    "purple": (140, 50, 180),
    "orange": (245, 125, 20),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
STYLES: tuple[str, ...] = ("solid", "outlined", "striped", "dotted")
DEFAULT_STYLE = "solid"
ATTRIBUTES: dict[str, tuple[str, ...]] = {"shape": SHAPES, "colour": COLOUR_NAMES, "style": STYLES}

IMAGE_SIZE = 32
_SS = 4  # supersampling factor for anti-aliased shape masks


@dataclass(frozen=True)
class DrawStyle:
    """How the data is drawn: the same attributes and captions, other pixels.

    The second demo model is trained on another ``DrawStyle`` (another palette, background, pattern
    geometry and jitter), so a protocol tuned on one model is checked on data it never saw.
    """

    background: tuple[int, int, int] = (238, 236, 230)
    palette: dict[str, tuple[int, int, int]] = field(default_factory=lambda: dict(COLOURS))
    radius: tuple[float, float] = (8.5, 12.0)
    offset: float = 3.0
    rotation: float = 10.0
    stripe_period: float = 4.0
    stripe_angle: float = 0.0  # degrees; 0 = horizontal stripes
    dot_period: float = 6.0
    dot_radius: float = 1.5
    outline_px: float = 2.2


DRAW_STYLES: dict[str, DrawStyle] = {
    "default": DrawStyle(),
    # The second model's data: bluish background, shifted palette, diagonal finer stripes, denser dots.
    "b": DrawStyle(
        background=(222, 228, 236),
        palette={
            "red": (196, 30, 58),
            "green": (60, 150, 40),
            "blue": (40, 100, 200),
            "yellow": (230, 205, 40),
            "purple": (120, 60, 170),
            "orange": (235, 110, 40),
        },
        radius=(7.5, 12.5),
        offset=4.0,
        rotation=20.0,
        stripe_period=5.0,
        stripe_angle=45.0,
        dot_period=5.0,
        dot_radius=1.3,
        outline_px=2.6,
    ),
    # The third model's data: warm grey background, another palette, vertical stripes, big dots.
    "c": DrawStyle(
        background=(232, 228, 220),
        palette={
            "red": (225, 50, 30),
            "green": (20, 140, 90),
            "blue": (50, 70, 190),
            "yellow": (245, 215, 0),
            "purple": (155, 40, 150),
            "orange": (250, 140, 0),
        },
        radius=(9.0, 12.5),
        offset=3.5,
        rotation=15.0,
        stripe_period=4.5,
        stripe_angle=90.0,
        dot_period=6.5,
        dot_radius=1.8,
        outline_px=2.0,
    ),
    # The fourth model's data: cool light background, muted palette, fine 30-degree stripes, small dots.
    "d": DrawStyle(
        background=(228, 234, 232),
        palette={
            "red": (205, 45, 45),
            "green": (45, 165, 75),
            "blue": (35, 90, 225),
            "yellow": (240, 190, 35),
            "purple": (130, 45, 195),
            "orange": (240, 120, 30),
        },
        radius=(8.0, 12.0),
        offset=3.0,
        rotation=25.0,
        stripe_period=3.5,
        stripe_angle=30.0,
        dot_period=5.5,
        dot_radius=1.2,
        outline_px=2.4,
    ),
}


def get_draw_style(name: str) -> DrawStyle:
    """A named ``DrawStyle`` ("default": the shipped model's data, "b": the second model's)."""
    try:
        return DRAW_STYLES[name]
    except KeyError:
        raise ValueError(f"unknown draw style {name!r}; choose one of {sorted(DRAW_STYLES)}") from None


class Sample(NamedTuple):
    """One generated example (unpacks as a tuple): the uint8 image, its caption, its attributes."""

    image: np.ndarray
    caption: str
    attributes: dict[str, str]


def caption(shape: str, colour: str, style: str, explicit_style: bool = False) -> str:
    """The caption for these attributes, following the module's grammar."""
    text = f"a {colour} {shape}"
    if style != DEFAULT_STYLE or explicit_style:
        text += f", {style}"
    return text


def caption_words() -> list[str]:
    """Every word (and punctuation token) the caption grammar can produce, for the tokenizer."""
    return ["a", ",", *COLOUR_NAMES, *SHAPES, *STYLES]


def _polygon(shape: str) -> np.ndarray:
    """Unit-size outline of a shape as (N, 2) points around the origin (y down), radius about 1."""
    if shape == "circle":
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        return np.stack([np.cos(t), np.sin(t)], 1)
    if shape == "square":
        s = 0.82
        return np.array([[-s, -s], [s, -s], [s, s], [-s, s]])
    if shape == "triangle":
        return np.array([[0.0, -1.0], [0.95, 0.75], [-0.95, 0.75]])
    if shape == "diamond":
        return np.array([[0.0, -1.05], [0.72, 0.0], [0.0, 1.05], [-0.72, 0.0]])
    if shape == "cross":
        a, b = 0.34, 0.95
        return np.array(
            [
                [-a, -b],
                [a, -b],
                [a, -a],
                [b, -a],
                [b, a],
                [a, a],
                [a, b],
                [-a, b],
                [-a, a],
                [-b, a],
                [-b, -a],
                [-a, -a],
            ]
        )
    if shape == "star":
        t = -np.pi / 2 + np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.05, 0.45)
        return np.stack([r * np.cos(t), r * np.sin(t)], 1)
    raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")


def _mask(points: np.ndarray, size: int, outline_px: float | None) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of a filled polygon (or of its inner outline band)."""
    big = Image.new("L", (size * _SS, size * _SS), 0)
    draw = ImageDraw.Draw(big)
    xy = [tuple(p) for p in (points * _SS).tolist()]
    if outline_px is None:
        draw.polygon(xy, fill=255)
    else:
        draw.polygon(xy, fill=None, outline=255, width=max(1, round(outline_px * _SS)))
    small = big.reduce(_SS)
    return np.asarray(small, dtype=np.float32) / 255.0


def _pattern(style: str, size: int, rng: np.random.Generator, draw: DrawStyle) -> np.ndarray:
    """Where the colour shows inside the shape (1) and where a pale fill shows instead (0)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if style == "striped":
        period = draw.stripe_period
        phase = rng.uniform(0, period)
        if draw.stripe_angle:
            a = math.radians(draw.stripe_angle)
            yy = yy * math.cos(a) + xx * math.sin(a)
        return (np.mod(yy + phase, period) < period / 2).astype(np.float32)
    if style == "dotted":
        period = draw.dot_period
        px, py = rng.uniform(0, period, size=2)
        dx = np.mod(xx - px + period / 2, period) - period / 2
        dy = np.mod(yy - py + period / 2, period) - period / 2
        d = np.sqrt(dx * dx + dy * dy)
        return 1.0 - np.clip(draw.dot_radius + 0.5 - d, 0.0, 1.0)  # pale dots on the colour
    return np.ones((size, size), np.float32)


def render(
    shape: str,
    colour: str,
    style: str,
    rng: np.random.Generator,
    size: int = IMAGE_SIZE,
    draw: DrawStyle = DRAW_STYLES["default"],
) -> np.ndarray:
    """Draw one shape with random but bounded jitter; returns uint8 (size, size, 3)."""
    s = size / 32.0
    radius = rng.uniform(*draw.radius) * s
    centre = size / 2 + rng.uniform(-draw.offset, draw.offset, size=2) * s
    angle = math.radians(rng.uniform(-draw.rotation, draw.rotation))
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    points = (_polygon(shape) @ rot.T) * radius + centre

    bg = np.array(draw.background, np.float32) + rng.uniform(-6, 6)
    col = np.clip(np.array(draw.palette[colour], np.float32) + rng.uniform(-12, 12, size=3), 0, 255)
    pale = 0.3 * col + 0.7 * bg

    if style == "outlined":
        alpha = _mask(points, size, outline_px=draw.outline_px * s)
        fill = np.broadcast_to(col, (size, size, 3))
    else:
        alpha = _mask(points, size, outline_px=None)
        pat = _pattern(style, size, rng, draw)[..., None]
        fill = pat * col + (1.0 - pat) * pale
    img = alpha[..., None] * fill + (1.0 - alpha[..., None]) * bg
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def sample(
    rng: np.random.Generator,
    size: int = IMAGE_SIZE,
    explicit_style_prob: float = 0.3,
    draw: DrawStyle = DRAW_STYLES["default"],
    **fixed: str,
) -> Sample:
    """Draw random attributes (any may be fixed by keyword: shape=, colour=, style=) and render them."""
    attrs = {
        key: fixed.get(key) or str(values[rng.integers(len(values))]) for key, values in ATTRIBUTES.items()
    }
    unknown = set(fixed) - set(ATTRIBUTES)
    if unknown:
        raise ValueError(f"unknown attribute(s) {sorted(unknown)}; use {sorted(ATTRIBUTES)}")
    explicit = bool(rng.random() < explicit_style_prob)
    image = render(attrs["shape"], attrs["colour"], attrs["style"], rng, size=size, draw=draw)
    return Sample(image, caption(attrs["shape"], attrs["colour"], attrs["style"], explicit), attrs)


def make_dataset(
    n: int,
    seed: int,
    size: int = IMAGE_SIZE,
    explicit_style_prob: float = 0.3,
    draw: DrawStyle = DRAW_STYLES["default"],
) -> tuple[np.ndarray, list[str], dict[str, np.ndarray]]:
    """`n` samples from one seed: images (n, size, size, 3) uint8, captions, and label indices per attribute."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, size, size, 3), np.uint8)
    captions: list[str] = []
    labels = {key: np.empty(n, np.int64) for key in ATTRIBUTES}
    for i in range(n):
        s = sample(rng, size=size, explicit_style_prob=explicit_style_prob, draw=draw)
        images[i] = s.image
        captions.append(s.caption)
        for key, values in ATTRIBUTES.items():
            labels[key][i] = values.index(s.attributes[key])
    return images, captions, labels

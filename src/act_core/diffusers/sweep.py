"""Strength sweeps: generate prompts x lambdas with one seed, and lay them out as a labelled PNG grid.

A sweep is how one judges a map: every column is one lambda (0 = the plain model), every row one
prompt, and each prompt uses the same seed in every column, so the only difference along a row is
the transport strength. Labels are drawn big enough to read even when the images are tiny (small
images are upscaled with NEAREST, which keeps their pixels honest).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from ..applying import check_strength
from ..errors import ACTInputError
from ..files import atomic_write
from ..maps import ACTMap
from ..validation import check_seed

MIN_CELL = 128
GAP = 4
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
_FONT_NAMES = ("DejaVuSans.ttf", "LiberationSans-Regular.ttf", "Arial.ttf")


def sweep_images(
    pipe: Any,
    act_map: ACTMap,
    prompts: Sequence[str],
    lambdas: Sequence[float],
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    **generate_kwargs: Any,
) -> list[list[Image.Image]]:
    """``images[row][column]`` for each prompt (row) at each lambda (column), with ACT disabled after.

    Every image uses a generator seeded with ``seed``, so a row differs only in lambda, and any cell
    can be reproduced by hand with the same seed. ``generate_kwargs`` go to the pipeline call
    (``num_inference_steps``, ``guidance_scale``, ``height``, ``width``, ``negative_prompt``, ...).
    """
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise ACTInputError("A sweep needs at least one non-empty prompt.")
    lambdas = [check_strength(lam, "lambda") for lam in lambdas]
    seed = check_seed(seed)
    if not lambdas:
        raise ACTInputError("A sweep needs at least one lambda, e.g. 0,0.5,1.")
    if not hasattr(pipe, "enable_act"):
        from .factory import act_pipeline

        pipe = act_pipeline(pipe)
    generate_kwargs = {**generate_kwargs, "output_type": "pil"}
    images: list[list[Image.Image | None]] = [[None] * len(lambdas) for _ in prompts]
    total, done = len(prompts) * len(lambdas), 0
    pipe.enable_act(act_map, strength=0.0)
    try:
        for column, lam in enumerate(lambdas):
            pipe.set_act_strength(lam)
            for row, prompt in enumerate(prompts):
                generator = torch.Generator("cpu").manual_seed(seed)
                # by name: some pipelines (Flux2Pipeline) take an image first
                images[row][column] = pipe(prompt=prompt, generator=generator, **generate_kwargs).images[0]
                done += 1
                if progress is not None:
                    progress(done, total)
    finally:
        pipe.disable_act()
    return images  # type: ignore[return-value]


def lambda_label(lam: float) -> str:
    """Column label, e.g. ``λ=0.25`` (shortest exact decimal; ASCII ``lambda=`` if the font lacks λ)."""
    return f"{'λ' if _has_lambda_glyph() else 'lambda'}={float(lam):g}"


@dataclass(frozen=True)
class GridLayout:
    """Pixel geometry of a grid; computed from counts and image size only, so tests can predict it."""

    rows: int
    columns: int
    cell: int  # side of a (square-fitted) cell; images are scaled into it
    scale: int  # integer NEAREST upscale factor of the images
    label_width: int
    header_height: int
    font_size: int
    gap: int = GAP

    @property
    def size(self) -> tuple[int, int]:
        width = self.label_width + self.columns * self.cell + (self.columns + 1) * self.gap
        height = self.header_height + self.rows * self.cell + (self.rows + 1) * self.gap
        return width, height

    def origin(self, row: int, column: int) -> tuple[int, int]:
        x = self.label_width + self.gap + column * (self.cell + self.gap)
        y = self.header_height + self.gap + row * (self.cell + self.gap)
        return x, y


def grid_layout(rows: int, columns: int, image_size: tuple[int, int], min_cell: int = MIN_CELL) -> GridLayout:
    """Layout for ``rows`` x ``columns`` images of ``image_size``, upscaled to at least ``min_cell`` px."""
    side = max(image_size)
    scale = max(1, math.ceil(min_cell / side))
    cell = side * scale
    font_size = max(12, min(32, cell // 9))
    return GridLayout(
        rows=rows,
        columns=columns,
        cell=cell,
        scale=scale,
        label_width=max(160, int(cell * 1.25)),
        header_height=int(font_size * 2.2),
        font_size=font_size,
    )


def grid_image(
    images: Sequence[Sequence[Image.Image]],
    row_labels: Sequence[str],
    column_labels: Sequence[str],
    min_cell: int = MIN_CELL,
) -> Image.Image:
    """A white-background grid with column labels on top and wrapped row labels on the left."""
    rows, columns = len(images), len(column_labels)
    if rows == 0 or columns == 0 or len(row_labels) != rows or any(len(r) != columns for r in images):
        raise ACTInputError(
            f"grid_image needs {len(row_labels)} rows of {columns} images, one label per row and column."
        )
    layout = grid_layout(rows, columns, images[0][0].size, min_cell)
    canvas = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = _font(layout.font_size)
    for column, label in enumerate(column_labels):
        x, _ = layout.origin(0, column)
        width = draw.textlength(label, font=font)
        draw.text((x + (layout.cell - width) / 2, layout.font_size * 0.5), label, fill=INK, font=font)
    for row, label in enumerate(row_labels):
        _, y = layout.origin(row, 0)
        lines = _wrap(draw, label, font, layout.label_width - 2 * layout.gap, layout.cell, layout.font_size)
        draw.multiline_text((layout.gap, y), "\n".join(lines), fill=INK, font=font, spacing=2)
        for column in range(columns):
            image = images[row][column].convert("RGB")
            w, h = image.size
            image = image.resize((w * layout.scale, h * layout.scale), Image.Resampling.NEAREST)
            x, y0 = layout.origin(row, column)
            canvas.paste(
                image, (x + (layout.cell - image.width) // 2, y0 + (layout.cell - image.height) // 2)
            )
    return canvas


def save_grid(image: Image.Image, path: str | os.PathLike, info: dict[str, Any] | None = None) -> Path:
    """Save a grid as PNG atomically, with the sweep settings as JSON in an ``act_sweep`` text chunk."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ACTInputError(f"Sweep grids are saved as .png files; got {path.name!r}.")
    png_info = PngInfo()
    if info is not None:
        png_info.add_text("act_sweep", json.dumps(info))
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=png_info))


def sweep_grid(
    pipe: Any,
    act_map: ACTMap,
    prompts: Sequence[str],
    lambdas: Sequence[float],
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    **generate_kwargs: Any,
) -> Image.Image:
    """``sweep_images`` laid out by ``grid_image``: rows = prompts, columns = lambdas."""
    images = sweep_images(pipe, act_map, prompts, lambdas, seed, progress, **generate_kwargs)
    prompts = [p for p in prompts if p.strip()]
    return grid_image(images, prompts, [lambda_label(lam) for lam in lambdas])


def _wrap(
    draw: ImageDraw.ImageDraw, text: str, font: Any, width: int, height: int, font_size: int
) -> list[str]:
    """Greedy word wrap to ``width`` px; lines beyond ``height`` are cut with an ellipsis."""
    lines: list[str] = []
    for word in text.split():
        while draw.textlength(word, font=font) > width and len(word) > 1:  # split over-long words
            cut = max(1, int(len(word) * width / draw.textlength(word, font=font)) - 1)
            lines.append(word[:cut])
            word = word[cut:]
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width and lines[-1] != "":
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    max_lines = max(1, height // (font_size + 2))
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: max(1, len(lines[-1]) - 1)] + "…"
    return lines


@lru_cache(maxsize=8)
def _font(size: int) -> Any:
    """A scalable TrueType font with λ (DejaVu on most Linux systems), else Pillow's built-in font."""
    for name in _FONT_NAMES:
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed-size bitmap font
        return ImageFont.load_default()


@lru_cache(maxsize=1)
def _has_lambda_glyph() -> bool:
    """False when the font would draw λ as a missing-glyph box (it then draws the same as U+10FFFD)."""
    font = _font(16)
    try:
        return bytes(font.getmask("λ")) != bytes(font.getmask("\U0010fffd"))
    except Exception:  # the bitmap fallback font cannot encode λ at all
        return False

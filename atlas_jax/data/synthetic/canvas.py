"""Drawing primitives shared by the task families: an exact colour palette, filled shapes,
arrows, clutter, and rejection-sampled placement that keeps objects apart.

Everything is drawn without anti-aliasing, so each object is a solid blob of one exact RGB
value; that is what lets the tests re-derive answers from pixels with connected components.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

WHITE = (255, 255, 255)
BLACK = (0, 0, 0)
ARROW_GREY = (70, 70, 70)

# Object colours (exact RGB; none is used for anything but objects of that colour).
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "blue": (40, 90, 220),
    "green": (30, 150, 60),
    "yellow": (225, 185, 0),
    "purple": (140, 60, 180),
    "orange": (240, 125, 20),
    "cyan": (0, 175, 190),
    "pink": (235, 110, 180),
    "brown": (130, 80, 40),
}

SHAPES = ("circle", "square", "triangle")


class PlacementError(RuntimeError):
    """Rejection sampling could not fit the requested objects; the difficulty asks for too many."""


def new_canvas(size: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (size, size), WHITE)
    return image, ImageDraw.Draw(image)


def draw_shape(draw: ImageDraw.ImageDraw, kind: str, center: tuple[float, float], radius: float, fill) -> None:
    """A filled shape inside the square of half-width `radius` around `center`."""
    x, y = center
    box = (round(x - radius), round(y - radius), round(x + radius), round(y + radius))
    if kind == "circle":
        draw.ellipse(box, fill=fill)
    elif kind == "square":
        draw.rectangle(box, fill=fill)
    elif kind == "triangle":
        draw.polygon([(box[0], box[3]), (box[2], box[3]), (round(x), box[1])], fill=fill)
    else:
        raise ValueError(f"shape kind {kind!r} is unknown; expected one of {SHAPES}")


def draw_arrow(draw: ImageDraw.ImageDraw, start, end, fill=ARROW_GREY, width: int = 2, head: float = 6.0) -> None:
    """A straight arrow from `start` to `end`; the head's tip touches `end`."""
    (x0, y0), (x1, y1) = start, end
    length = math.hypot(x1 - x0, y1 - y0)
    ux, uy = (x1 - x0) / length, (y1 - y0) / length
    bx, by = x1 - ux * head, y1 - uy * head  # base of the head
    draw.line([(x0, y0), (bx, by)], fill=fill, width=width)
    half = head * 0.55
    draw.polygon([(x1, y1), (bx - uy * half, by + ux * half), (bx + uy * half, by - ux * half)], fill=fill)


def scatter_clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int, count: int,
                    avoid: Callable[[float, float], bool], colors=((150, 150, 150), (185, 185, 185), (120, 120, 120))) -> None:
    """Short grey strokes and specks (colours never used by objects) where `avoid(x, y)` is False."""
    for _ in range(count):
        x, y = rng.uniform(0, size, 2)
        if avoid(x, y):
            continue
        c = colors[int(rng.integers(len(colors)))]
        if rng.random() < 0.5:
            ang = rng.uniform(0, math.pi)
            ln = rng.uniform(2, 6)
            x1, y1 = x + ln * math.cos(ang), y + ln * math.sin(ang)
            if not avoid(x1, y1):
                draw.line([(x, y), (x1, y1)], fill=c, width=1)
        else:
            draw.rectangle((round(x), round(y), round(x) + 1, round(y) + 1), fill=c)


def place_points(rng: np.random.Generator, n: int, low: tuple[float, float], high: tuple[float, float],
                 min_dist: float, taken: list[tuple[float, float, float]] | None = None,
                 radius: float = 0.0, ok: Callable[[float, float], bool] = lambda x, y: True,
                 tries: int = 4000) -> list[tuple[float, float]]:
    """`n` centres uniform in the box [low, high], each at least `min_dist` from every (x, y, r) in
    `taken`, with bounding boxes (half-widths r and `radius`) at least 3 px apart, and accepted by
    `ok`. `taken` is extended with the new centres."""
    taken = taken if taken is not None else []
    out: list[tuple[float, float]] = []
    for _ in range(tries):
        if len(out) == n:
            return out
        x, y = float(rng.uniform(low[0], high[0])), float(rng.uniform(low[1], high[1]))
        if not ok(x, y):
            continue
        # Chebyshev distance keeps the objects' bounding boxes 3 px apart (squares touch at corners
        # otherwise); the Euclidean `min_dist` spreads them out.
        if all(math.hypot(x - tx, y - ty) >= min_dist and max(abs(x - tx), abs(y - ty)) >= tr + radius + 3
               for tx, ty, tr in taken):
            out.append((x, y))
            taken.append((x, y, radius))
    if len(out) == n:
        return out
    raise PlacementError(f"could only place {len(out)} of {n} objects (min_dist={min_dist}); lower the object count")

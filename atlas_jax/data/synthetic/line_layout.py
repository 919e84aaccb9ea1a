"""Two labelled anchor points A and B whose (undrawn) line the <|Line|> families reason about."""

from __future__ import annotations

import math

import numpy as np

from atlas_jax.data.synthetic import canvas, glyphs

ANCHOR_RGB = (20, 30, 110)  # dark navy: only the A and B dots use it


def place_line(rng: np.random.Generator, size: int, angle_deg: tuple[float, float]):
    """A, B (float[2] each) with |angle of AB against the x axis| in `angle_deg` (image y points down)."""
    for _ in range(200):
        ang = math.radians(rng.uniform(*angle_deg)) * (1 if rng.random() < 0.5 else -1)
        half = rng.uniform(0.18, 0.3) * size
        mx, my = rng.uniform(0.35, 0.65, 2) * size
        a = (mx - half * math.cos(ang), my - half * math.sin(ang))
        b = (mx + half * math.cos(ang), my + half * math.sin(ang))
        lo, hi = 0.1 * size, 0.9 * size
        if all(lo <= c <= hi for c in (*a, *b)):
            return (a, b) if rng.random() < 0.5 else (b, a)
    raise canvas.PlacementError(f"could not place a line with angle in {angle_deg} at {size} px")


def signed_distance(p, a, b) -> float:
    """> 0 on one side of line AB, < 0 on the other; |value| is the pixel distance."""
    (px, py), (ax, ay), (bx, by) = p, a, b
    return ((bx - ax) * (py - ay) - (by - ay) * (px - ax)) / math.hypot(bx - ax, by - ay)


def is_above(p, a, b) -> bool:
    """True if p is above the (non-vertical) line AB on screen, i.e. has a smaller y at p's x."""
    (px, py), (ax, ay), (bx, by) = p, a, b
    return py < ay + (by - ay) * (px - ax) / (bx - ax)


def draw_anchor(draw, p, name: str, s: float, size: int) -> None:
    """A navy dot with its letter beside it (on the side away from the image edge)."""
    r = 2.5 * s
    x, y = p
    draw.ellipse((round(x - r), round(y - r), round(x + r), round(y + r)), fill=ANCHOR_RGB)
    scale = max(1, round(s))
    dx = 7 * s if x < size * 0.8 else -7 * s
    glyphs.draw_text_centered(draw, (x + dx, y - 5 * s), name, canvas.BLACK, scale)


def label_box(p, s: float, size: int, margin: float = 4.0):
    """(x, y, r) exclusion circle covering an anchor's dot and label, for placement."""
    x, y = p
    dx = 7 * s if x < size * 0.8 else -7 * s
    return (x + dx / 2, y - 2.5 * s, 9 * s + margin)

"""Scenes in the starting point's own terms, shared by the families that ask what it can see
(`zoom_color`, `outline_shape`, `point_where`, `line_left`): a few objects, each in its own one of
the image's 2 x 2 quadrants ("top left", "top right", "bottom left", "bottom right", words of
perception pretraining's grid), each of a distinct colour.

Why these families exist next to the eight harder ones: the tiny perception-pretrained start
(`atlas_jax/pretrained/perceive_tiny`) does not count, read 5x7 glyphs or judge a line's side, and
fine-tuned on families that need those it answers each with a constant (bench/RESULTS.md, "Why
the main job's SFT is image-blind"). Here each object fills most of a quadrant (2 x 2 merged image
tokens), perception pretraining draws these same scenes (`perception.QUADRANT_SHARE`), and the
trajectories state the evidence in the sentence it was pretrained to write (`described`).

Held-out conditions, shared: in_distribution draws 2-4 objects of half-width 17-22 px (at 112
px), each within 4 px of its quadrant's centre, as in training; shifted moves them 6-9 px off
the centre (each still inside its quadrant, so up to 3 px smaller; answers unchanged); hard draws
them at half-width 8-11 px, about half the trained size.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from atlas_jax.data.synthetic import canvas
from atlas_jax.data.synthetic.family import by_condition, scale_of

POSITIONS = ("top left", "top right", "bottom left", "bottom right")
GRID = 2
COLORS = ("red", "blue", "green", "yellow", "purple", "orange")  # the answers; the rest of the palette is unused
OBJECTS = (2, 4)
RADIUS = by_condition((17.0, 22.0), hard=(8.0, 11.0))
OFFSET = by_condition((0.0, 4.0), shifted=(6.0, 9.0))  # px at 112 from the quadrant's centre, in each axis
MARGIN = 2.0  # px at 112 between an object and its quadrant's border


@dataclasses.dataclass(frozen=True)
class Difficulty:
    """No settings: the conditions are this module's (each family's `Difficulty`)."""


def draw(rng: np.random.Generator, split: str, size: int):
    """(image, objects): objects sorted by quadrant (`cell`, row-major), each {'cell', 'where', 'color',
    'kind', 'center', 'radius'}."""
    s = scale_of(size)
    n = int(rng.integers(OBJECTS[0], OBJECTS[1] + 1))
    cells = sorted(int(k) for k in rng.choice(len(POSITIONS), size=n, replace=False))
    colors = [str(c) for c in rng.choice(COLORS, size=n, replace=False)]
    cell = size / GRID
    image, pen = canvas.new_canvas(size)
    objects = []
    for where, color in zip(cells, colors):
        row, col = divmod(where, GRID)
        dx, dy = rng.uniform(*OFFSET[split], 2) * rng.choice((-1, 1), 2) * s
        x, y = (col + 0.5) * cell + dx, (row + 0.5) * cell + dy
        # An object stays inside its quadrant: one moved off the centre is drawn smaller if need be.
        radius = min(float(rng.uniform(*RADIUS[split]) * s), float(cell / 2 - MARGIN * s - max(abs(dx), abs(dy))))
        kind = str(rng.choice(canvas.SHAPES))
        canvas.draw_shape(pen, kind, (x, y), radius, canvas.PALETTE[color])
        objects.append({"cell": where, "where": POSITIONS[where], "color": color, "kind": kind, "center": [x, y],
                        "radius": radius})
    return image, objects


def draw_with_target(rng: np.random.Generator, split: str, size: int):
    """(image, objects, target): `draw`, and one of its objects drawn uniformly, the one asked about."""
    image, objects = draw(rng, split, size)
    return image, objects, objects[int(rng.integers(len(objects)))]


def phrase(o: dict) -> str:
    """'a red circle', 'an orange square'."""
    return f"{'an' if o['color'][0] in 'aeiou' else 'a'} {o['color']} {o['kind']}"


def described(o: dict) -> str:
    """'Top left: a red circle.': the sentence perception pretraining's descriptions give each object
    (`perception`), so a trajectory states its evidence in the words the start was trained to produce."""
    return f"{o['where'].capitalize()}: {phrase(o)}."


def box(o: dict) -> tuple[int, int, int, int]:
    """The pixel box (x0, y0, x1, y1), ends exclusive, that `canvas.draw_shape` paints `o` within:
    PIL fills its rounded corner coordinates inclusively, hence the + 1."""
    (x, y), r = o["center"], o["radius"]
    return round(x - r), round(y - r), round(x + r) + 1, round(y + r) + 1


def column(o: dict) -> int:
    return o["cell"] % GRID

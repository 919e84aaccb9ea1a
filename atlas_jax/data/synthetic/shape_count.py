"""`shape_count` (<|Shape|>): count the objects of one colour inside a black rectangle.

Held-out conditions: in_distribution draws 1-4 targets in the training colours; shifted asks
about a colour never drawn in training (cyan, pink or brown), still 1-4 targets; hard has 5 or 6
targets, counts never trained on.

Why <|Shape|> should help: objects of the target colour also sit outside the rectangle (the
trap), so the count needs the region isolated first; outlining it is the operation, and a module
attending to the rectangle's inside sees only what is to be counted.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np

from atlas_jax.data.synthetic import canvas
from atlas_jax.data.synthetic.family import Drawn, boxed, by_condition, join_words, pick, plural, require, scale_of, split_colors

COUNTS = by_condition((1, 2, 3, 4), hard=(5, 6))
HELD_OUT_COLORS = ("cyan", "pink", "brown")
TRAIN_COLORS = tuple(c for c in canvas.PALETTE if c not in HELD_OUT_COLORS)


@dataclasses.dataclass(frozen=True)
class Difficulty:
    """inside_distractors / outside_objects: objects of other colours inside the region, and of any
    colour outside it; num_colors: colours in play; radius: object half-width range at 112 px."""

    inside_distractors: int = 2
    outside_objects: int = 5
    num_colors: int = 3
    radius: tuple[float, float] = (3.5, 5.0)


def build(rng: np.random.Generator, split: str, d: Difficulty, size: int) -> Drawn:
    require(2 <= d.num_colors <= len(TRAIN_COLORS), "shape_count", "num_colors", f"2..{len(TRAIN_COLORS)}", d.num_colors)
    require(0 < d.radius[0] <= d.radius[1], "shape_count", "radius", "(low, high) with 0 < low <= high", d.radius)
    s = scale_of(size)
    image, draw = canvas.new_canvas(size)
    colors = split_colors(rng, split, d.num_colors, TRAIN_COLORS, HELD_OUT_COLORS)
    target = colors[0]
    count = int(rng.choice(COUNTS[split]))
    border = max(1, round(s))

    # Region: a rectangle large enough for count + distractors.
    w, h = rng.uniform(0.48, 0.62, 2) * size
    x0, y0 = rng.uniform(0.04 * size, size - w - 0.04 * size), rng.uniform(0.04 * size, size - h - 0.04 * size)
    region = [round(x0), round(y0), round(x0 + w), round(y0 + h)]
    draw.rectangle(region, outline=canvas.BLACK, width=border)

    r_hi = d.radius[1] * s
    pad = border + r_hi + 2
    taken: list = []
    inside_pts = canvas.place_points(rng, count + d.inside_distractors, (region[0] + pad, region[1] + pad),
                                     (region[2] - pad, region[3] - pad), 2 * r_hi + 3, taken, r_hi)

    def outside(x, y):
        return (x + pad < region[0] or x - pad > region[2] or y + pad < region[1] or y - pad > region[3])

    outside_pts = canvas.place_points(rng, d.outside_objects, (r_hi + 1, r_hi + 1), (size - r_hi - 2, size - r_hi - 2),
                                      2 * r_hi + 3, taken, r_hi, ok=outside)
    others = colors[1:]
    objects = []
    for k, (x, y) in enumerate(inside_pts + outside_pts):
        inside = k < len(inside_pts)
        if inside:
            color = target if k < count else str(rng.choice(others))
        else:
            color = str(rng.choice(colors))  # target-coloured objects outside are the trap
        kind = str(rng.choice(canvas.SHAPES))
        radius = float(rng.uniform(d.radius[0], d.radius[1]) * s)
        canvas.draw_shape(draw, kind, (x, y), radius, canvas.PALETTE[color])
        objects.append({"kind": kind, "color": color, "center": [x, y], "radius": radius, "inside": inside})

    kinds = Counter(o["kind"] for o in objects if o["inside"] and o["color"] == target)
    parts = join_words([plural(n, k) for k, n in sorted(kinds.items())])
    question = pick(rng, (f"How many {target} objects are inside the black rectangle?",
                          f"Count the {target} shapes that lie inside the black rectangle.",
                          f"Inside the black rectangle, how many {target} objects are there?"))
    intent = pick(rng, (f"To count only the {target} objects in the rectangle, I outline that region.",
                        "I mark the region bounded by the black rectangle so that objects outside it are ignored.",
                        f"Only the rectangle matters here, so I highlight its inside before counting {target} objects."))
    response = (f"{intent} <|Shape|> Inside the outlined region the {target} objects are {parts}, "
                f"so there {'is' if count == 1 else 'are'} {count}. {boxed(str(count))}")
    scene = {"region": region, "border": border, "objects": objects, "target_color": target,
             "target_rgb": list(canvas.PALETTE[target]), "count": count}
    return Drawn(image, question, response, str(count), scene)

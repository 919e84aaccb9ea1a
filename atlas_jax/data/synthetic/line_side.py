"""`line_side` (<|Line|>): are points P and Q on the same side of the line through A and B?

The line itself is not drawn; drawing it is the auxiliary-line step. Held-out conditions, by the
angle of AB against the horizontal (answers are always yes / no): in_distribution |angle| in
[0, 35] deg as in training; shifted [45, 60] deg, an angle never trained on; hard [70, 88] deg,
near-vertical lines, where the sides are left / right rather than above / below.

Why <|Line|> should help: P and Q sit far from A and B, so which side of the undrawn line each is
on can only be judged with the line extended across the image; drawing it is the operation.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from atlas_jax.data.synthetic import canvas, line_layout
from atlas_jax.data.synthetic.family import Drawn, boxed, by_condition, pick, scale_of

ANGLES = by_condition((0.0, 35.0), shifted=(45.0, 60.0), hard=(70.0, 88.0))
POINT_RGB = {"P": (220, 40, 40), "Q": (30, 150, 60)}


@dataclasses.dataclass(frozen=True)
class Difficulty:
    """min_line_dist: how far (px at 112) P and Q stay from the line; small values are harder to judge."""

    min_line_dist: float = 7.0


def _side_words(p, a, b, steep: bool) -> str:
    if not steep:
        return "above" if line_layout.is_above(p, a, b) else "below"
    # Near-vertical lines: left / right at the point's height.
    (px, py), (ax, ay), (bx, by) = p, a, b
    return "left of" if px < ax + (bx - ax) * (py - ay) / (by - ay) else "right of"


def build(rng: np.random.Generator, split: str, d: Difficulty, size: int) -> Drawn:
    s = scale_of(size)
    a, b = line_layout.place_line(rng, size, ANGLES[split])
    same = bool(rng.random() < 0.5)
    side_p = 1 if rng.random() < 0.5 else -1
    want = {"P": side_p, "Q": side_p if same else -side_p}
    taken = [line_layout.label_box(a, s, size), line_layout.label_box(b, s, size)]
    pts = {}
    for name in ("P", "Q"):
        def ok(x, y, name=name):
            dist = line_layout.signed_distance((x, y), a, b)
            return dist * want[name] >= d.min_line_dist * s
        (pts[name],) = canvas.place_points(rng, 1, (0.1 * size, 0.1 * size), (0.88 * size, 0.88 * size),
                                           12 * s, taken, 9 * s, ok=ok)
    image, draw = canvas.new_canvas(size)
    line_layout.draw_anchor(draw, a, "A", s, size)
    line_layout.draw_anchor(draw, b, "B", s, size)
    for name, p in pts.items():
        line_layout.draw_anchor(draw, p, name, s, size)
        r = 2.5 * s  # recolour the dot so P and Q are told apart from the anchors by colour too
        draw.ellipse((round(p[0] - r), round(p[1] - r), round(p[0] + r), round(p[1] + r)), fill=POINT_RGB[name])

    answer = "yes" if same else "no"
    steep = split == "hard"  # near-vertical lines: left / right reads better than above / below
    wp, wq = _side_words(pts["P"], a, b, steep), _side_words(pts["Q"], a, b, steep)
    verdict = "on the same side" if same else "on opposite sides"
    question = pick(rng, ("Are points P and Q on the same side of the straight line through A and B? Answer yes or no.",
                          "If a straight line is drawn through A and B, do P and Q lie on the same side of it? Answer yes or no.",
                          "Does the straight line through A and B separate P from Q? Answer yes if they are on the same side, no otherwise."))
    intent = pick(rng, ("To compare the two points, I draw the line through A and B and extend it across the image.",
                        "I draw an auxiliary line through A and B, extended to the image borders.",
                        "The points are hard to compare by eye, so I draw the full line through A and B."))
    response = f"{intent} <|Line|> With the line drawn, P is {wp} it and Q is {wq} it, so they are {verdict}. {boxed(answer)}"
    scene = {"A": list(a), "B": list(b), "P": list(pts["P"]), "Q": list(pts["Q"]), "same_side": same,
             "angle_deg": float(np.degrees(np.arctan2(b[1] - a[1], b[0] - a[0]))),
             "point_rgb": {k: list(v) for k, v in POINT_RGB.items()}, "anchor_rgb": list(line_layout.ANCHOR_RGB)}
    return Drawn(image, question, response, answer, scene)

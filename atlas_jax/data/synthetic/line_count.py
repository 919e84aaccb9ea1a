"""`line_count` (<|Line|> + <|Shape|>): how many dots of one colour lie above the line through A and B?

The line is not drawn. Held-out conditions: in_distribution has 1-3 target dots above the line, in
the training colours; shifted asks about a dot colour never drawn in training (cyan or pink),
still 1-3 dots; hard has 4 or 5 dots above, counts never trained on.

Why <|Line|> then <|Shape|> should help: "above" is defined by a line that is not drawn, so the
count needs the line through A and B extended across the image and the region above it marked
before counting; dots of the same colour below it are the trap.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from atlas_jax.data.synthetic import canvas, line_layout
from atlas_jax.data.synthetic.family import Drawn, boxed, by_condition, pick, plural, scale_of, split_colors

COUNTS = by_condition((1, 2, 3), hard=(4, 5))
DOT_COLORS = ("red", "green", "orange", "purple")  # never navy-like blue: that marks A and B
HELD_OUT_COLORS = ("cyan", "pink")


@dataclasses.dataclass(frozen=True)
class Difficulty:
    """below: target dots under the line; distractors: dots of other colours; min_line_dist: px at 112."""

    below: int = 2
    distractors: int = 4
    min_line_dist: float = 5.0
    max_angle_deg: float = 30.0


def build(rng: np.random.Generator, split: str, d: Difficulty, size: int) -> Drawn:
    s = scale_of(size)
    a, b = line_layout.place_line(rng, size, (0.0, d.max_angle_deg))
    colors = split_colors(rng, split, 2, DOT_COLORS, HELD_OUT_COLORS)
    target = colors[0]
    count = int(rng.choice(COUNTS[split]))
    r = 2.5 * s
    taken = [line_layout.label_box(a, s, size), line_layout.label_box(b, s, size)]
    lo, hi = (r + 2, r + 2), (size - r - 3, size - r - 3)

    def side_ok(want_above):
        def ok(x, y):
            far = abs(line_layout.signed_distance((x, y), a, b)) >= d.min_line_dist * s
            return far and line_layout.is_above((x, y), a, b) == want_above
        return ok

    above = canvas.place_points(rng, count, lo, hi, 2 * r + 4, taken, r, ok=side_ok(True))
    below = canvas.place_points(rng, d.below, lo, hi, 2 * r + 4, taken, r, ok=side_ok(False))
    other = canvas.place_points(rng, d.distractors, lo, hi, 2 * r + 4, taken, r,
                                ok=lambda x, y: abs(line_layout.signed_distance((x, y), a, b)) >= d.min_line_dist * s)
    image, draw = canvas.new_canvas(size)
    line_layout.draw_anchor(draw, a, "A", s, size)
    line_layout.draw_anchor(draw, b, "B", s, size)
    dots = []
    for j, (x, y) in enumerate(above + below + other):
        color = target if j < count + d.below else colors[1]
        canvas.draw_shape(draw, "circle", (x, y), r, canvas.PALETTE[color])
        dots.append({"color": color, "center": [x, y]})

    question = pick(rng, (f"How many {target} dots lie above the straight line through A and B?",
                          f"Imagine a line through A and B, extended to the image edges. How many {target} dots are above it?",
                          f"Count the {target} dots on the upper side of the straight line through A and B."))
    intent = pick(rng, ("To split the dots by the line, I draw the line through A and B across the whole image",
                        "I draw an auxiliary line through A and B, extended to both edges",
                        "Which dots are above is easier to see with the line drawn, so I draw it through A and B"))
    response = (f"{intent} <|Line|> and outline the region above it. <|Shape|> In the region above the line there "
                f"{'is' if count == 1 else 'are'} {plural(count, target + ' dot')}. {boxed(str(count))}")
    scene = {"A": list(a), "B": list(b), "dots": dots, "target_color": target,
             "target_rgb": list(canvas.PALETTE[target]), "anchor_rgb": list(line_layout.ANCHOR_RGB), "count": count}
    return Drawn(image, question, response, str(count), scene)

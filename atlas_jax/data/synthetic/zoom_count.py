"""`zoom_count` (<|Manip|> + <|Shape|>): count tiny dots of one colour inside a small red frame in a
large cluttered image; the same colour appears outside the frame too.

Held-out conditions: in_distribution has 1-3 target dots in the training colours; shifted asks
about a dot colour never drawn in training (cyan or pink), still 1-3 dots; hard has 4 or 5 dots,
counts never trained on.

Why <|Manip|> then <|Shape|> should help: the dots are a few pixels wide, smaller than a 14-px
patch, so reading them needs a closer look at the frame (the zoom), and the same colour outside
the frame is the trap that outlining the frame's inside removes.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from atlas_jax.data.synthetic import canvas
from atlas_jax.data.synthetic.family import Drawn, boxed, by_condition, pick, plural, scale_of, split_colors

COUNTS = by_condition((1, 2, 3), hard=(4, 5))
FRAME_RGB = (220, 40, 40)
DOT_COLORS = ("blue", "green", "orange", "purple")  # never red: red is the frame
HELD_OUT_COLORS = ("cyan", "pink")


@dataclasses.dataclass(frozen=True)
class Difficulty:
    """inside_distractors: dots of other colours in the frame; outside_dots: dots elsewhere;
    clutter: grey strokes at 112 px; frame: side of the frame as a fraction of the image."""

    inside_distractors: int = 2
    outside_dots: int = 14
    clutter: int = 120
    frame: float = 0.34


def build(rng: np.random.Generator, split: str, d: Difficulty, size: int) -> Drawn:
    s = scale_of(size)
    colors = split_colors(rng, split, 3, DOT_COLORS, HELD_OUT_COLORS)
    target = colors[0]
    count = int(rng.choice(COUNTS[split]))
    r = 1.5 * s  # dots a few pixels wide: too small to count reliably without zooming
    side = d.frame * size
    fx0, fy0 = rng.uniform(0.03 * size, size - side - 0.03 * size, 2)
    frame = [round(fx0), round(fy0), round(fx0 + side), round(fy0 + side)]

    def outside(x, y):
        return x < frame[0] - r - 3 or x > frame[2] + r + 3 or y < frame[1] - r - 3 or y > frame[3] + r + 3

    image, draw = canvas.new_canvas(size)
    canvas.scatter_clutter(draw, rng, size, int(d.clutter * s * s), avoid=lambda x, y: not outside(x, y))
    draw.rectangle(frame, outline=FRAME_RGB, width=1)
    pad = r + 3
    taken: list = []
    inside = canvas.place_points(rng, count + d.inside_distractors, (frame[0] + pad, frame[1] + pad),
                                 (frame[2] - pad, frame[3] - pad), 2 * r + 4, taken, r)
    out = canvas.place_points(rng, d.outside_dots, (r + 1, r + 1), (size - r - 2, size - r - 2), 2 * r + 4, taken, r,
                              ok=outside)
    dots = []
    for j, (x, y) in enumerate(inside + out):
        is_in = j < len(inside)
        color = (target if j < count else str(rng.choice(colors[1:]))) if is_in else str(rng.choice(colors))
        canvas.draw_shape(draw, "circle", (x, y), r, canvas.PALETTE[color])
        dots.append({"color": color, "center": [x, y], "inside": is_in})

    question = pick(rng, (f"How many {target} dots are inside the red frame?",
                          f"Count the {target} dots within the small red frame.",
                          f"Looking only inside the red frame, how many {target} dots can you find?"))
    intent = pick(rng, ("The dots are tiny, so I first zoom in on the red frame",
                        "To see the small dots clearly I enlarge the area around the red frame",
                        "Counting tiny dots needs a closer look, so I magnify the red frame"))
    response = (f"{intent} <|Manip|> and then outline the area inside the frame. <|Shape|> "
                f"Inside the outlined area there {'is' if count == 1 else 'are'} {plural(count, target + ' dot')}. "
                f"{boxed(str(count))}")
    scene = {"frame": frame, "dots": dots, "target_color": target, "target_rgb": list(canvas.PALETTE[target]),
             "frame_rgb": list(FRAME_RGB), "count": count}
    return Drawn(image, question, response, str(count), scene)

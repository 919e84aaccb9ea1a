"""`zoom_read` (<|Manip|>): a tiny digit inside a small red frame, in a cluttered image with other
digits around, must be zoomed into to be read.

Held-out conditions (answers are always a digit 0-9): in_distribution puts the frame anywhere but
the bottom-right quadrant, as in training; shifted puts it in the bottom-right quadrant, where no
training frame ever was; hard keeps the training quadrants under twice the training clutter.

Why <|Manip|> should help: the digit is a 5x7 glyph, smaller than one 14-px patch, among decoy
digits and clutter; reading it needs the frame enlarged (a module attending to the frame's patch).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from atlas_jax.data.synthetic import canvas, glyphs
from atlas_jax.data.synthetic.family import Drawn, boxed, in_bottom_right, pick, scale_of

FRAME_RGB = (220, 40, 40)
DECOY_RGB = (60, 60, 60)


@dataclasses.dataclass(frozen=True)
class Difficulty:
    """clutter: grey strokes/specks (at 112 px; scales with area); decoys: other digits outside the frame."""

    clutter: int = 160
    decoys: int = 6


def _quadrant_ok(split: str, x: float, y: float, size: int) -> bool:
    return in_bottom_right(x, y, size) == (split == "shifted")


def build(rng: np.random.Generator, split: str, d: Difficulty, size: int) -> Drawn:
    s = scale_of(size)
    digit = str(int(rng.integers(0, 10)))
    # The digit stays 5x7 whatever the image size: it is meant to be small.
    fw, fh = glyphs.GLYPH_W + 4, glyphs.GLYPH_H + 4  # interior with a 2-px white margin
    (cx, cy), = canvas.place_points(rng, 1, (fw, fh), (size - fw - 1, size - fh - 1), 0,
                                    ok=lambda x, y: _quadrant_ok(split, x, y, size))
    x0, y0 = round(cx - fw / 2), round(cy - fh / 2)
    frame = [x0 - 1, y0 - 1, x0 + fw, y0 + fh]  # 1-px outline around the interior
    keep_out = (frame[0] - 3, frame[1] - 3, frame[2] + 3, frame[3] + 3)

    def near_frame(x, y):
        return keep_out[0] <= x <= keep_out[2] and keep_out[1] <= y <= keep_out[3]

    image, draw = canvas.new_canvas(size)
    clutter = int(d.clutter * s * s * (2 if split == "hard" else 1))
    canvas.scatter_clutter(draw, rng, size, clutter, avoid=near_frame)
    taken = [(cx, cy, max(fw, fh))]
    decoy_pts = canvas.place_points(rng, d.decoys, (6, 6), (size - 8, size - 8), 10, taken, 5)
    decoys = []
    for x, y in decoy_pts:
        v = str(int(rng.integers(0, 10)))
        glyphs.draw_text_centered(draw, (x, y), v, DECOY_RGB)
        decoys.append({"digit": v, "center": [x, y]})
    draw.rectangle(frame, outline=FRAME_RGB, width=1)
    draw.rectangle((x0, y0, x0 + fw - 1, y0 + fh - 1), fill=canvas.WHITE)
    glyphs.draw_text(draw, (x0 + 2, y0 + 2), digit, canvas.BLACK)

    question = pick(rng, ("What digit is written inside the small red frame?",
                          "Read the digit in the red box. Which digit is it?",
                          "Somewhere in this cluttered picture is a tiny red frame with a digit in it. What is the digit?"))
    intent = pick(rng, ("The digit in the red frame is too small to read at this scale, so I zoom in on the frame.",
                        "I crop the image to the small red frame and enlarge it.",
                        "The red frame is only a few pixels wide, so I magnify that part of the image."))
    response = f"{intent} <|Manip|> In the enlarged view the frame contains the digit {digit}. {boxed(digit)}"
    scene = {"digit": digit, "frame": frame, "frame_center": [cx, cy], "decoys": decoys,
             "frame_rgb": list(FRAME_RGB), "clutter": clutter}
    return Drawn(image, question, response, digit, scene)

"""`line_left` (<|Line|>): which of two named objects, in different columns (left / right halves), is further left.

Held-out conditions: those of `cell_scene` (shifted: objects off their quadrant's centre; hard: smaller objects); answers
are always one of the six object colours (one of the two named).

Why <|Line|> should help: the two objects may sit in different rows, so comparing them by eye
means carrying one's horizontal position across the image; a vertical line drawn through the
first does that, and the trajectory places both before answering. Guessing between the two named
colours scores 0.5 without the image: the image-swap control shows what the text alone gives.
"""

from __future__ import annotations

import numpy as np

from atlas_jax.data.synthetic import cell_scene
from atlas_jax.data.synthetic.canvas import PlacementError
from atlas_jax.data.synthetic.family import Drawn, boxed, pick


Difficulty = cell_scene.Difficulty


def build(rng: np.random.Generator, split: str, d: Difficulty, size: int) -> Drawn:
    image, objects = cell_scene.draw(rng, split, size)
    pairs = [(a, b) for a in objects for b in objects if cell_scene.column(a) != cell_scene.column(b)]
    if not pairs:  # every object in one column: redraw (the registry retries with a fresh RNG)
        raise PlacementError("all objects in one column")
    first, second = pairs[int(rng.integers(len(pairs)))]
    left = first if cell_scene.column(first) < cell_scene.column(second) else second
    c1, c2 = first["color"], second["color"]
    question = pick(rng, (f"Which object is further left, the {c1} one or the {c2} one?",
                          f"Of the {c1} and the {c2} objects, which is further to the left?"))
    intent = pick(rng, (f"I draw a vertical line through the {c1} object.", f"I extend a vertical line from the {c1} object."))
    response = (f"{intent} <|Line|> {cell_scene.described(first)} {cell_scene.described(second)} "
                f"So the {left['color']} object is further left. {boxed(left['color'])}")
    scene = {"objects": objects, "first": objects.index(first), "second": objects.index(second)}
    # The <|Line|> is drawn through the first named object: its module should attend to that one.
    return Drawn(image, question, response, left["color"], scene, target_box=cell_scene.box(first))

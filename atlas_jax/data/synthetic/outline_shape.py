"""`outline_shape` (<|Shape|>): the shape (circle, square, triangle) of the object of a named colour.

Held-out conditions: those of `cell_scene` (shifted: objects off their quadrant's centre; hard: smaller objects); answers
are always one of the three shapes.

Why <|Shape|> should help: the named object sits among others of every shape; outlining it
isolates the one whose outline is asked about, and the trajectory says where it is and what it is.
"""

from __future__ import annotations

import numpy as np

from atlas_jax.data.synthetic import cell_scene
from atlas_jax.data.synthetic.family import Drawn, boxed, pick


Difficulty = cell_scene.Difficulty


def build(rng: np.random.Generator, split: str, d: Difficulty, size: int) -> Drawn:
    image, objects, target = cell_scene.draw_with_target(rng, split, size)
    color = target["color"]
    question = pick(rng, (f"What shape is the {color} object?", f"Is the {color} object a circle, a square or a triangle?"))
    intent = pick(rng, (f"I outline the {color} object.", f"I trace the outline of the {color} object."))
    response = f"{intent} <|Shape|> {cell_scene.described(target)} It is a {target['kind']}. {boxed(target['kind'])}"
    return Drawn(image, question, response, target["kind"], {"objects": objects, "target": objects.index(target)},
                 target_box=cell_scene.box(target))

"""`point_where` (<|Arrow|>): where (which of the four quadrants) the object of a named colour is.

Held-out conditions: those of `cell_scene` (shifted: objects off their quadrant's centre; hard: smaller objects); answers
are always one of the four quadrants.

Why <|Arrow|> should help: the answer is a place; an arrow drawn to the named object marks it, and
a module attending from the arrow's token to the image finds the object's token.
"""

from __future__ import annotations

import numpy as np

from atlas_jax.data.synthetic import cell_scene
from atlas_jax.data.synthetic.family import Drawn, boxed, pick


Difficulty = cell_scene.Difficulty


def build(rng: np.random.Generator, split: str, d: Difficulty, size: int) -> Drawn:
    image, objects, target = cell_scene.draw_with_target(rng, split, size)
    color = target["color"]
    question = pick(rng, (f"Where is the {color} object?", f"In which part of the image is the {color} object?"))
    intent = pick(rng, (f"I draw an arrow to the {color} object.", f"I point an arrow at the {color} object."))
    response = f"{intent} <|Arrow|> {cell_scene.described(target)} {boxed(target['where'])}"
    return Drawn(image, question, response, target["where"], {"objects": objects, "target": objects.index(target)},
                 target_box=cell_scene.box(target))

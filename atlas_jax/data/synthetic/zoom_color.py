"""`zoom_color` (<|Manip|>): the colour of the object in a named quadrant.

Held-out conditions: those of `cell_scene` (shifted: objects off their quadrant's centre; hard: smaller objects); answers
are always one of the six object colours.

Why <|Manip|> should help: the object shares the image with up to three others of other colours;
enlarging the named quadrant gives a module its 2 x 2 merged image tokens alone, and the
trajectory names the enlarged object before answering.
"""

from __future__ import annotations

import numpy as np

from atlas_jax.data.synthetic import cell_scene
from atlas_jax.data.synthetic.family import Drawn, boxed, pick


Difficulty = cell_scene.Difficulty


def build(rng: np.random.Generator, split: str, d: Difficulty, size: int) -> Drawn:
    image, objects, target = cell_scene.draw_with_target(rng, split, size)
    where = target["where"]
    question = pick(rng, (f"What colour is the object at the {where}?", f"Which colour does the object at the {where} have?"))
    intent = pick(rng, (f"I zoom into the {where} of the image.", f"To see it clearly, I enlarge the {where} of the image."))
    response = f"{intent} <|Manip|> {cell_scene.described(target)} {boxed(target['color'])}"
    return Drawn(image, question, response, target["color"], {"objects": objects, "target": objects.index(target)},
                 target_box=cell_scene.box(target))

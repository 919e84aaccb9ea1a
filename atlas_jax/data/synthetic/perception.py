"""Dense perception data: the pretraining that teaches a from-scratch tiny VLM to see.

Each image holds 1-4 objects (distinct colours from `canvas.PALETTE`, shapes from `canvas.SHAPES`)
and 0-1 digits (`glyphs`), each in its own cell of a 3 x 3 grid (the coarse positions
`POSITIONS`); or one large object in the centre (`LARGE_SHARE`); or 2-4 large objects, one per
quadrant, as the main job's families draw them (`QUADRANT_SHARE`, `cell_scene`). Half the samples
ask for a description that names every object's position, colour and shape, the digit and the
count (~60 supervised tokens per image, all readable only from the pixels); the rest ask one
short question (`QUESTION_KINDS`) answered in `\\boxed{}`, the form the task suite and the
evaluation use.

    sample = generate("train", index=17, seed=0)                  # one Sample, pure in its arguments
    source = PerceptionSource("train", seed=0)                    # random access, unlimited
    sample, scene = generate_with_scene("held_out", 3)            # + what was drawn (probes)

The two `SPLITS` differ by seed stream only (in-distribution held-out prompts): perception is
the starting point, not a test of generalisation.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np

from atlas_jax.data.sample import Sample
from atlas_jax.data.synthetic import canvas, cell_scene, glyphs
from atlas_jax.data.synthetic.family import boxed, pick, plural, scale_of

SPLITS = ("train", "held_out")  # one distribution, two seed streams
GRID = 3
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
COLORS = tuple(canvas.PALETTE)
DIGITS = tuple("0123456789")
MAX_OBJECTS = 4
RADIUS = (7.0, 10.0)  # object half-width at 112 px: about one merged image token (28 px)
CENTER = POSITIONS.index("center")
# Why large objects: a from-scratch decoder learns to read a solid-colour image in 25 steps but
# ignored one-token objects for 500 steps, and 30% of scenes with radius 20-50 px were not enough
# in 700 (bench/RESULTS.md); objects filling much of the image, where most tokens carry the
# answer, start the reading that smaller objects then use.
LARGE_SHARE = 0.3
LARGE_RADIUS = (30.0, 50.0)
# Why quadrant scenes: a start pretrained on the two kinds above read the colour of a large
# central object (0.55 exact, 0.07 with a swapped image) and nothing of an object at a place, so
# the families that name a place stayed image-blind after SFT (bench/RESULTS.md, issue 12).
QUADRANT_SHARE = 0.4
QUESTION_KINDS = ("count", "color_at", "shape_at", "where_color", "digit")
DESCRIBE_SHARE = 0.5  # the rest are short questions, one kind drawn uniformly
_NAMESPACE = zlib.crc32(b"perception")  # keeps these RNG streams apart from the task families'


def _draw_scene(rng: np.random.Generator, size: int):
    """(image, scene): objects and digits in distinct cells, jittered around the cell centres; in
    a `LARGE_SHARE` of scenes one large object in the centre instead, in a `QUADRANT_SHARE` large
    objects in the quadrants. Each object's `where` is its position's name."""
    s = scale_of(size)
    cell = size / GRID
    kind_draw = rng.random()
    if kind_draw >= 1 - QUADRANT_SHARE:
        image, objects = cell_scene.draw(rng, "train", size)
        return image, {"objects": objects, "digits": [], "image_size": size, "grid": cell_scene.GRID}
    large = bool(kind_draw < LARGE_SHARE)
    n_objects = 1 if large else int(rng.integers(1, MAX_OBJECTS + 1))
    n_digits = 0 if large else int(rng.integers(0, 2))
    cells = [CENTER] if large else [int(k) for k in rng.choice(len(POSITIONS), size=n_objects + n_digits, replace=False)]
    colors = [str(c) for c in rng.choice(COLORS, size=n_objects, replace=False)]
    image, draw = canvas.new_canvas(size)
    objects, digits = [], []
    for k, where in enumerate(cells):
        row, col = divmod(where, GRID)
        x, y = (col + 0.5) * cell + rng.uniform(-4, 4) * s, (row + 0.5) * cell + rng.uniform(-4, 4) * s
        if k < n_objects:
            kind, radius = str(rng.choice(canvas.SHAPES)), float(rng.uniform(*(LARGE_RADIUS if large else RADIUS)) * s)
            canvas.draw_shape(draw, kind, (x, y), radius, canvas.PALETTE[colors[k]])
            objects.append({"cell": where, "where": POSITIONS[where], "color": colors[k], "kind": kind, "center": [x, y],
                            "radius": radius})
        else:
            digit = str(int(rng.integers(0, 10)))
            glyphs.draw_text_centered(draw, (x, y), digit, canvas.BLACK, scale=max(1, round(2 * s)))
            digits.append({"cell": where, "where": POSITIONS[where], "digit": digit, "center": [x, y]})
    # Reading order (row-major cells): the description's order is a function of the image alone.
    objects.sort(key=lambda o: o["cell"])
    return image, {"objects": objects, "digits": digits, "image_size": size, "grid": GRID}


def _describe(scene: dict) -> tuple[str, str]:
    objects, digits = scene["objects"], scene["digits"]
    n = len(objects)
    parts = [f"There {'is' if n == 1 else 'are'} {plural(n, 'object')}."]
    parts += [cell_scene.described(o) for o in objects]  # the sentence the families' trajectories reuse
    parts += [f"The digit {d['digit']} is at the {d['where']}." for d in digits] or ["There is no digit."]
    return " ".join(parts + [boxed(str(n))]), str(n)


def _question(rng: np.random.Generator, kind: str, scene: dict) -> tuple[str, str]:
    """(question, answer) of one kind about the scene."""
    objects = scene["objects"]
    target = objects[int(rng.integers(len(objects)))]
    where = target["where"]
    if kind == "count":
        return pick(rng, ("How many objects are in the image?", "Count the coloured shapes in the image.")), str(len(objects))
    if kind == "color_at":
        return f"What colour is the object at the {where}?", target["color"]
    if kind == "shape_at":
        return f"What shape is the object at the {where}?", target["kind"]
    if kind == "where_color":
        return f"Where is the {target['color']} object?", where
    if kind == "digit":
        if not scene["digits"]:
            return "Which digit is written in the image?", "none"
        return "Which digit is written in the image?", scene["digits"][0]["digit"]
    raise ValueError(f"question kind {kind!r} is unknown; expected one of {QUESTION_KINDS}")


def generate_with_scene(split: str, index: int, seed: int = 0, image_size: int = 112) -> tuple[Sample, dict[str, Any]]:
    """Sample `index` of `split` and the scene it was drawn from; a pure function of the arguments."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is unknown; expected one of {list(SPLITS)}")
    if image_size % 28 or image_size < 84:
        raise ValueError(f"image_size must be a multiple of 28 and >= 84; got {image_size}")
    rng = np.random.default_rng([_NAMESPACE, int(seed), SPLITS.index(split), int(index)])
    image, scene = _draw_scene(rng, image_size)
    if rng.random() < DESCRIBE_SHARE:
        kind, question = "describe", pick(rng, ("Describe every object in the image.", "What is drawn in this image?"))
        response, answer = _describe(scene)
    else:
        kind = pick(rng, QUESTION_KINDS)
        question, answer = _question(rng, kind, scene)
        response = boxed(answer)
    sample = Sample(images=[image], question=question, response=response, answer=answer, task=f"perception/{kind}",
                    response_answer_only=boxed(answer), uid=f"{split}/perception/seed={seed}/i={index}")
    return sample, dict(scene, kind=kind, split=split)


def generate(split: str, index: int, seed: int = 0, image_size: int = 112) -> Sample:
    return generate_with_scene(split, index, seed, image_size)[0]


class PerceptionSource:
    """Random access to samples 0..size-1 of a split, generated on the fly (a `make_dataset` source).
    The default size is effectively unlimited: a training run never repeats an image."""

    def __init__(self, split: str, seed: int = 0, image_size: int = 112, size: int = 2**31 - 1):
        self.split, self.seed, self.image_size, self.size = split, seed, image_size, size
        self.name = f"perception/{split}/seed={seed}"

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < self.size:
            raise IndexError(f"{self.name}: index {index} outside [0, {self.size})")
        return generate(self.split, int(index), self.seed, self.image_size)


def corpus(seed: int = 0, num: int = 2000, image_size: int = 112) -> list[str]:
    """Texts a tokenizer for perception pretraining is trained on: questions and responses of the
    first `num` training samples, plus every answer word (so each is in the vocabulary)."""
    texts = []
    for i in range(num):
        s = generate("train", i, seed, image_size)
        texts += [s.question, s.response]
    return texts + [" ".join(POSITIONS + COLORS + canvas.SHAPES + DIGITS)]

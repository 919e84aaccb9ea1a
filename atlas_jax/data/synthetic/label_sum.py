"""`label_sum` (<|Text|>): shapes carry digit labels; add the labels of the shapes of one colour.

Held-out conditions: in_distribution adds 2 or 3 labels of a training colour; shifted adds the
labels of a colour never drawn in training (cyan, pink or brown), still 2 or 3, so the sums stay
within the training sums (2-27); hard adds 4 or 5 labels whose sum exceeds every training sum
(28-45), so neither the number of terms nor the answer was trained on.

Why <|Text|> should help: the answer needs the digits of only the target-coloured shapes, written
down one by one before adding; a module attending to those shapes reads exactly those labels.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from atlas_jax.data.synthetic import canvas, glyphs
from atlas_jax.data.synthetic.family import Drawn, boxed, by_condition, join_words, pick, require, scale_of, split_colors

TERMS = by_condition((2, 3), hard=(4, 5))
MAX_TRAIN_SUM = 9 * max(TERMS["train"])  # hard sums lie above it
HELD_OUT_COLORS = ("cyan", "pink", "brown")
TRAIN_COLORS = tuple(c for c in canvas.PALETTE if c not in HELD_OUT_COLORS)


@dataclasses.dataclass(frozen=True)
class Difficulty:
    """distractors: labelled shapes of other colours; num_colors: colours in play."""

    distractors: int = 3
    num_colors: int = 3


def build(rng: np.random.Generator, split: str, d: Difficulty, size: int) -> Drawn:
    require(2 <= d.num_colors <= len(TRAIN_COLORS), "label_sum", "num_colors", f"2..{len(TRAIN_COLORS)}", d.num_colors)
    s = scale_of(size)
    scale = max(1, round(s))
    # Half-width that keeps a ring of colour around the glyph, so each shape stays one blob.
    radius = 7.0 * scale
    colors = split_colors(rng, split, d.num_colors, TRAIN_COLORS, HELD_OUT_COLORS)
    target = colors[0]
    k = int(rng.choice(TERMS[split]))
    target_labels = rng.integers(1, 10, size=k)
    while split == "hard" and target_labels.sum() <= MAX_TRAIN_SUM:
        target_labels = rng.integers(1, 10, size=k)
    centers = canvas.place_points(rng, k + d.distractors, (radius + 2, radius + 2), (size - radius - 3, size - radius - 3),
                                  2 * radius + 5 * s, radius=radius)
    image, draw = canvas.new_canvas(size)
    objects = []
    for j, (x, y) in enumerate(centers):
        color = target if j < k else str(rng.choice(colors[1:]))
        kind = "circle" if rng.random() < 0.5 else "square"
        label = int(target_labels[j]) if j < k else int(rng.integers(1, 10))
        canvas.draw_shape(draw, kind, (x, y), radius, canvas.PALETTE[color])
        glyphs.draw_text_centered(draw, (x, y), str(label), canvas.WHITE, scale)
        objects.append({"kind": kind, "color": color, "center": [x, y], "radius": radius, "label": label})
    order = sorted((o for o in objects if o["color"] == target), key=lambda o: (o["center"][1], o["center"][0]))
    labels = [o["label"] for o in order]
    total = sum(labels)
    question = pick(rng, (f"What is the sum of the numbers written on the {target} shapes?",
                          f"Add up the numbers on all {target} shapes. What is the total?",
                          f"Each shape shows a number. What do the {target} shapes' numbers add up to?"))
    intent = pick(rng, (f"To add the right numbers, I write down the label of every {target} shape.",
                        f"I note the number on each {target} shape, reading from top to bottom.",
                        f"I annotate each {target} shape with its number so none is missed."))
    response = (f"{intent} <|Text|> The {target} shapes are labelled {join_words([str(v) for v in labels])}, "
                f"and {' + '.join(str(v) for v in labels)} = {total}. {boxed(str(total))}")
    scene = {"objects": objects, "target_color": target, "target_rgb": list(canvas.PALETTE[target]),
             "num_terms": k, "glyph_scale": scale}
    return Drawn(image, question, response, str(total), scene)

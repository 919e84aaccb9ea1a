"""`arrow_label` (<|Arrow|> + <|Text|>): nodes carry digits; follow the arrows from the green-ringed
node and add the digits of every node on the way (start and end included).

Held-out conditions: in_distribution follows 1 or 2 arrows from a start outside the bottom-right
quadrant, as in training (sums 3-24); shifted puts the green-ringed start in the bottom-right
quadrant, where no training chain ever started, still 1 or 2 arrows; hard follows 3 or 4 arrows
through nodes whose sum exceeds every training sum (25-35), so neither the path length nor the
answer was trained on.

Why <|Arrow|> then <|Text|> should help: the path is found by following arrows among distractors
(the arrow step), and the answer needs the digit of every node on it written down (the text step).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from atlas_jax.data.synthetic import canvas, glyphs
from atlas_jax.data.synthetic.family import Drawn, boxed, by_condition, in_bottom_right, pick, require, scale_of
from atlas_jax.data.synthetic.graph_layout import MIN_RADIUS, draw_graph, layout_graph

CHAIN_LENGTHS = by_condition((1, 2), hard=(3, 4))
MAX_TRAIN_SUM = sum(range(9, 9 - max(CHAIN_LENGTHS["train"]) - 1, -1))  # 9 + 8 + 7: hard sums lie above it
START_RGB = (30, 150, 60)


@dataclasses.dataclass(frozen=True)
class Difficulty:
    """num_nodes: nodes drawn, at most 9 (labels are the distinct digits 1-9); distractor_prob: chance
    a node off the chain has an arrow; radius: node radius in px at 112 (>= graph_layout.MIN_RADIUS)."""

    num_nodes: int = 7
    distractor_prob: float = 0.7
    radius: float = 7.0


def build(rng: np.random.Generator, split: str, d: Difficulty, size: int) -> Drawn:
    require(max(CHAIN_LENGTHS[split]) + 1 <= d.num_nodes <= 9, "arrow_label", "num_nodes",
            f"{max(CHAIN_LENGTHS[split]) + 1}..9 for split {split!r} (labels are distinct digits)", d.num_nodes)
    require(d.radius >= MIN_RADIUS, "arrow_label", "radius", f">= {MIN_RADIUS} (px at 112; smaller nodes' digits touch their outline)",
            d.radius)
    s = scale_of(size)
    length = int(rng.choice(CHAIN_LENGTHS[split]))
    radius = d.radius * s
    centers, edges, chain = layout_graph(rng, size, d.num_nodes, length, radius, d.distractor_prob,
                                         start_ok=lambda x, y: in_bottom_right(x, y, size) == (split == "shifted"))
    labels = [int(v) for v in rng.choice(np.arange(1, 10), size=d.num_nodes, replace=False)]
    while split == "hard" and sum(labels[k] for k in chain) <= MAX_TRAIN_SUM:
        labels = [int(v) for v in rng.choice(np.arange(1, 10), size=d.num_nodes, replace=False)]
    image, draw = canvas.new_canvas(size)
    draw_graph(draw, centers, edges, radius, s)
    for j, ((x, y), label) in enumerate(zip(centers, labels)):
        start = j == chain[0]
        width = max(2, round(2 * s)) if start else max(1, round(s))
        draw.ellipse((round(x - radius), round(y - radius), round(x + radius), round(y + radius)), fill=canvas.WHITE,
                     outline=START_RGB if start else canvas.BLACK, width=width)
        # Floor, not round: the glyph must clear the node's outline.
        glyphs.draw_text_centered(draw, (x, y), str(label), canvas.BLACK, scale=max(1, int(s)))

    path = [labels[k] for k in chain]
    total = sum(path)
    question = pick(rng, ("Start at the node with the green ring and follow the arrows until they stop. "
                          "What is the sum of the numbers on all nodes you visit, including the first and last?",
                          "Follow the arrows from the green-ringed node to the end of the chain and add up every "
                          "number on the way (start and end included). What is the total?"))
    intent = pick(rng, ("To total the path, I trace the arrows from the green node",
                        "I follow the direction of each arrow starting from the green node",
                        "The total depends on which nodes the arrows lead through, so I point out the path from the green node"))
    response = (f"{intent} <|Arrow|> and write down the number on each node along the way. <|Text|> "
                f"The path visits {' -> '.join(map(str, path))}, and {' + '.join(map(str, path))} = {total}. "
                f"{boxed(str(total))}")
    scene = {"nodes": [{"label": lab, "center": [float(x), float(y)]} for lab, (x, y) in zip(labels, centers)],
             "edges": [[labels[u], labels[v]] for u, v in edges], "start": labels[chain[0]], "chain_length": length,
             "radius": radius}
    return Drawn(image, question, response, str(total), scene)

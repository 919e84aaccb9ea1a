"""`arrow_chain` (<|Arrow|>): follow a chain of arrows from a start node, name the node it ends at.

Held-out conditions (answers are always a node letter): in_distribution follows 1-3 arrows from a
start node outside the bottom-right quadrant, as in training; shifted puts the start node in the
bottom-right quadrant, where no training chain ever started; hard follows 4 or 5 arrows, chains
longer than any trained on.

Why <|Arrow|> should help: the answer is where a chain of arrows leads among distractor arrows,
some pointing into the chain; marking each step's direction from the start is the operation.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from atlas_jax.data.synthetic import canvas, glyphs
from atlas_jax.data.synthetic.family import Drawn, boxed, by_condition, in_bottom_right, pick, require, scale_of
from atlas_jax.data.synthetic.graph_layout import MIN_RADIUS, draw_graph, layout_graph

CHAIN_LENGTHS = by_condition((1, 2, 3), hard=(4, 5))
# Letters that cannot be confused with digits or each other at 5x7.
LETTERS = "ABCDEFGHJKLMNPRSTUVWXYZ"


@dataclasses.dataclass(frozen=True)
class Difficulty:
    """num_nodes: nodes drawn (chain + distractors); distractor_prob: chance a distractor node has an arrow;
    radius: node radius in px at 112 (>= graph_layout.MIN_RADIUS)."""

    num_nodes: int = 8
    distractor_prob: float = 0.7
    radius: float = 7.0


def build(rng: np.random.Generator, split: str, d: Difficulty, size: int) -> Drawn:
    require(max(CHAIN_LENGTHS[split]) + 1 <= d.num_nodes <= len(LETTERS), "arrow_chain", "num_nodes",
            f"{max(CHAIN_LENGTHS[split]) + 1}..{len(LETTERS)} for split {split!r}", d.num_nodes)
    require(d.radius >= MIN_RADIUS, "arrow_chain", "radius", f">= {MIN_RADIUS} (px at 112; smaller nodes' letters touch their outline)",
            d.radius)
    s = scale_of(size)
    length = int(rng.choice(CHAIN_LENGTHS[split]))
    radius = d.radius * s
    centers, edges, chain = layout_graph(rng, size, d.num_nodes, length, radius, d.distractor_prob,
                                         start_ok=lambda x, y: in_bottom_right(x, y, size) == (split == "shifted"))
    names = [str(c) for c in rng.choice(list(LETTERS), size=d.num_nodes, replace=False)]
    image, draw = canvas.new_canvas(size)
    draw_graph(draw, centers, edges, radius, s)
    for (x, y), name in zip(centers, names):
        draw.ellipse((round(x - radius), round(y - radius), round(x + radius), round(y + radius)),
                     fill=canvas.WHITE, outline=canvas.BLACK, width=max(1, round(s)))
        # Floor, not round: the glyph must clear the node's outline.
        glyphs.draw_text_centered(draw, (x, y), name, canvas.BLACK, scale=max(1, int(s)))

    start, end = names[chain[0]], names[chain[-1]]
    path = " -> ".join(names[k] for k in chain)
    question = pick(rng, (f"Start at node {start} and follow the arrows. At which node does the chain end?",
                          f"Beginning at {start}, keep following the outgoing arrow. Which node do you reach last?",
                          f"Follow the arrows starting from node {start} until there is no arrow left to follow. Where do you stop?"))
    intent = pick(rng, (f"To find where the chain ends, I trace the arrows from node {start}.",
                        f"I mark the direction of each arrow along the path that starts at {start}.",
                        f"The answer depends on where the arrows lead, so I point out each step from {start}."))
    response = f"{intent} <|Arrow|> Following {path}, node {end} has no outgoing arrow, so the chain ends at {end}. {boxed(end)}"
    scene = {"nodes": {n: [float(x), float(y)] for n, (x, y) in zip(names, centers)},
             "edges": [[names[u], names[v]] for u, v in edges], "start": start, "chain_length": length,
             "radius": radius}
    return Drawn(image, question, response, end, scene)

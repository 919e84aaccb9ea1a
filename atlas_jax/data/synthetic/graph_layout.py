"""Node-and-arrow layouts shared by `arrow_chain` and `arrow_label`.

A layout is a set of round nodes and directed edges where every node has at most one outgoing
arrow, so "follow the arrows from X" always has one answer. The start node's chain has exactly
the requested length; the other nodes get distractor arrows (some pointing into the chain).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from atlas_jax.data.synthetic import canvas

# Node radius (px at 112) below which a 5x7 label touches the node's outline.
MIN_RADIUS = 6.5


def _segment_point_dist(p, a, b) -> float:
    (px, py), (ax, ay), (bx, by) = p, a, b
    dx, dy = bx - ax, by - ay
    t = max(0.0, min(1.0, ((px - ax) * dx + (py - ay) * dy) / (dx * dx + dy * dy)))
    return math.hypot(px - (ax + t * dx), py - (ay + t * dy))


def _spread(centers, edges, min_deg: float = 35.0) -> bool:
    """True if the arrows meeting at any node leave it at least `min_deg` apart, so heads don't merge."""
    by_node: dict[int, list[float]] = {}
    for u, v in edges:
        (x0, y0), (x1, y1) = centers[u], centers[v]
        by_node.setdefault(u, []).append(math.degrees(math.atan2(y1 - y0, x1 - x0)))
        by_node.setdefault(v, []).append(math.degrees(math.atan2(y0 - y1, x0 - x1)))
    for angles in by_node.values():
        for i in range(len(angles)):
            for j in range(i):
                diff = abs(angles[i] - angles[j]) % 360
                if min(diff, 360 - diff) < min_deg:
                    return False
    return True


def layout_graph(rng: np.random.Generator, size: int, num_nodes: int, chain_length: int, radius: float,
                 distractor_prob: float = 0.7, attempts: int = 60,
                 start_ok: Callable[[float, float], bool] = lambda x, y: True):
    """Returns (centers float[N][2], edges [(u, v)], chain [node indices from the start to the end]).

    Node 0 is the start, placed where `start_ok(x, y)`; chain = [0, 1, ..., chain_length]. No arrow
    passes within ~6 px (at 112 px) of the outline of a node other than its two ends, so arrows never
    look like they touch a third node.
    """
    if num_nodes < chain_length + 1:
        raise ValueError(f"num_nodes={num_nodes} cannot hold a chain of length {chain_length}; expected >= {chain_length + 1}")
    low, high = (radius + 2, radius + 2), (size - radius - 3, size - radius - 3)
    min_dist = max(4.2 * radius, size / (1.6 * math.sqrt(num_nodes)))
    for _ in range(attempts):
        try:
            taken: list = []
            centers = canvas.place_points(rng, 1, low, high, min_dist, taken, radius, ok=start_ok)
            centers += canvas.place_points(rng, num_nodes - 1, low, high, min_dist, taken, radius)
        except canvas.PlacementError:
            continue
        edges = [(k, k + 1) for k in range(chain_length)]
        # Distractors leave only nodes off the chain and point to earlier-ordered nodes (acyclic).
        off = list(range(chain_length + 1, num_nodes))
        rng.shuffle(off)
        order = list(range(chain_length + 1)) + off
        for pos, u in enumerate(order[chain_length + 1:], start=chain_length + 1):
            if rng.random() < distractor_prob:
                edges.append((u, int(order[int(rng.integers(pos))])))
        clearance = radius * (1 + 6 / 7)  # ~6 px at 112 px: a passing arrow never grazes a node
        if all(_segment_point_dist(centers[w], centers[u], centers[v]) >= clearance
               for u, v in edges for w in range(num_nodes) if w not in (u, v)) and _spread(centers, edges):
            return centers, edges, list(range(chain_length + 1))
    raise canvas.PlacementError(f"no clean arrow layout for {num_nodes} nodes at {size} px; lower num_nodes")


def draw_graph(draw, centers, edges, radius: float, s: float) -> None:
    """Arrows run edge-to-edge between node circles."""
    for u, v in edges:
        (x0, y0), (x1, y1) = centers[u], centers[v]
        dist = math.hypot(x1 - x0, y1 - y0)
        ux, uy = (x1 - x0) / dist, (y1 - y0) / dist
        gap = radius + 1.5
        canvas.draw_arrow(draw, (x0 + ux * gap, y0 + uy * gap), (x1 - ux * gap, y1 - uy * gap),
                          width=max(1, round(1.4 * s)), head=5.0 * s)

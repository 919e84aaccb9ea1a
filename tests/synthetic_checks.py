"""Independent answer checkers for the synthetic suite.

Each checker re-derives a sample's answer WITHOUT the code path that drew it: from the image
pixels (exact-colour masks, scipy connected components, centroids, template reading of the
bitmap font) and, for arrow graphs, from nodes, labels and arrows read off the pixels, followed by
a separately written solver. Only the question text is read besides the image. Each returns
(answer, layout) where `layout` is the held-out property as measured here.
"""

from __future__ import annotations

import functools
import math
import re

import numpy as np
from scipy import ndimage

from atlas_jax.data.synthetic import canvas, glyphs

WHITE = np.array([255, 255, 255])
BLACK = np.array([0, 0, 0])


def pixels(sample) -> np.ndarray:
    return np.asarray(sample.images[0].convert("RGB"), dtype=np.int32)


def mask_of(px: np.ndarray, rgb) -> np.ndarray:
    return np.all(px == np.asarray(rgb), axis=-1)


def blobs(mask: np.ndarray, fill_holes: bool = False) -> list[dict]:
    """Connected components (scipy, 8-connectivity): centroid (x, y), pixel area, bbox (x0, y0, x1, y1)."""
    if fill_holes:
        mask = ndimage.binary_fill_holes(mask)
    lab, n = ndimage.label(mask, structure=np.ones((3, 3)))
    out = []
    for k, sl in enumerate(ndimage.find_objects(lab), start=1):
        ys, xs = np.nonzero(lab == k)
        out.append({"c": (xs.mean(), ys.mean()), "area": len(xs), "bbox": (sl[1].start, sl[0].start, sl[1].stop - 1, sl[0].stop - 1),
                    "mask": lab == k})
    return out


def colour_in_question(question: str) -> tuple[int, int, int]:
    """The RGB of the colour word that qualifies the counted things ('red dots', 'blue shapes')."""
    names = [n for n in canvas.PALETTE if re.search(rf"\b{n} (?:objects|shapes|dots)\b", question)]
    assert len(names) == 1, f"expected exactly one colour word in {question!r}, found {names}"
    return canvas.PALETTE[names[0]]


def frame_interior(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Inner box (x0, y0, x1, y1 inclusive) of an axis-aligned rectangular outline drawn in `mask`."""
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
    mid_y = (y0 + y1) // 2
    t = 0
    while mask[mid_y, x0 + t]:
        t += 1
    return x0 + t, y0 + t, x1 - t, y1 - t


@functools.lru_cache(maxsize=None)
def _cropped_glyph(ch: str) -> np.ndarray:
    g = glyphs.glyph(ch)
    gy, gx = np.nonzero(g)
    return g[gy.min():gy.max() + 1, gx.min():gx.max() + 1]


def read_glyphs(ink: np.ndarray, chars: str) -> str:
    """The character whose bitmap (at any integer scale) equals `ink` cropped to its bounding box."""
    ys, xs = np.nonzero(ink)
    crop = ink[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    hits = []
    for ch in chars:
        g = _cropped_glyph(ch)
        scale = crop.shape[0] // g.shape[0]
        if scale >= 1 and np.array_equal(np.kron(g, np.ones((scale, scale), bool)), crop):
            hits.append(ch)
    assert len(hits) == 1, f"glyph reading ambiguous or failed: {hits}"
    return hits[0]


def count_inside(px, frame_mask, rgb) -> int:
    x0, y0, x1, y1 = frame_interior(frame_mask)
    n = 0
    for b in blobs(mask_of(px, rgb)):
        bx0, by0, bx1, by1 = b["bbox"]
        inside = x0 <= bx0 and bx1 <= x1 and y0 <= by0 and by1 <= y1
        outside = bx1 < x0 or bx0 > x1 or by1 < y0 or by0 > y1
        assert inside or outside, f"object at {b['c']} straddles the frame"
        n += inside
    return n


def side(p, a, b) -> float:
    return (b[0] - a[0]) * (p[1] - a[1]) - (b[1] - a[1]) * (p[0] - a[0])


def anchors(px, rgb) -> tuple:
    found = blobs(mask_of(px, rgb))
    assert len(found) == 2, f"expected the two anchor dots A and B, found {len(found)}"
    return found[0]["c"], found[1]["c"]


def follow(edges: list, start):
    """The chain from `start` along out-edges (written apart from the generator): list of nodes."""
    out = {}
    for u, v in edges:
        assert u not in out, f"node {u} has two outgoing arrows"
        out[u] = v
    path = [start]
    while path[-1] in out:
        path.append(out[path[-1]])
        assert len(path) <= len(edges) + 1, "cycle"
    return path


def disc(shape, center, r) -> np.ndarray:
    """bool[H, W]: pixels whose centres lie within r of `center` (x, y)."""
    ys, xs = np.ogrid[0:shape[0], 0:shape[1]]
    return (xs - center[0]) ** 2 + (ys - center[1]) ** 2 <= r * r


ARROW_CHAIN_LETTERS = "ABCDEFGHJKLMNPRSTUVWXYZ"
START_RING_RGB = (30, 150, 60)


def read_node(px, center, radius, chars) -> str:
    """The label drawn in black inside a round node."""
    ink = mask_of(px, BLACK) & disc(px.shape[:2], center, radius + 1)
    # Drop the node's black outline: the one component as wide as the node.
    keep = [b["mask"] for b in blobs(ink) if b["bbox"][2] - b["bbox"][0] < 1.5 * radius]
    assert keep, f"no label apart from the outline of the node at {center}"
    return read_glyphs(np.any(keep, axis=0), chars)


# ---- node-and-arrow graphs, read from pixels --------------------------------------------------

def graph_nodes(px, ring_rgbs) -> tuple[list[tuple[float, float]], float]:
    """Round nodes: outline rings in any of `ring_rgbs`, holes filled, keeping the node-sized blobs
    (the labels inside are much smaller). Returns centroids (x, y) and the radius in pixels."""
    found = [b for rgb in ring_rgbs for b in blobs(mask_of(px, rgb), fill_holes=True)]
    widths = [b["bbox"][2] - b["bbox"][0] + 1 for b in found]
    nodes = [b for b, w in zip(found, widths) if w >= 0.7 * max(widths)]
    node_widths = [b["bbox"][2] - b["bbox"][0] + 1 for b in nodes]
    assert max(node_widths) - min(node_widths) <= 2, f"nodes of different sizes: {node_widths}"
    return [b["c"] for b in nodes], (float(np.mean(node_widths)) - 1) / 2


def _segment_dist(p, a, b):
    """Distance from point(s) p = (x, y) (floats or arrays) to the segment a-b."""
    (px_, py), (ax, ay), (bx, by) = p, a, b
    dx, dy = bx - ax, by - ay
    t = np.clip(((px_ - ax) * dx + (py - ay) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
    return np.hypot(px_ - (ax + t * dx), py - (ay + t * dy))


def _longest_gap(covered, a, b, margin) -> float:
    """Longest stretch (px) of the segment a-b, `margin` px clear of both ends, with no ink near it."""
    (x0, y0), (x1, y1) = a, b
    d = math.hypot(x1 - x0, y1 - y0)
    ts = np.arange(margin, d - margin, 0.5)
    hit = covered[np.rint(y0 + (y1 - y0) * ts / d).astype(int), np.rint(x0 + (x1 - x0) * ts / d).astype(int)]
    longest = run = 0
    for h in hit:
        run = 0 if h else run + 1
        longest = max(longest, run)
    return longest * 0.5


def graph_edges(px, centers, radius) -> list[tuple[int, int]]:
    """Directed arrows between the nodes at `centers`, read from the arrow-grey ink.

    A pair of nodes is joined if grey ink (within 2 px: wide lines sit off the exact centre line)
    runs without a gap along the straight segment between their outlines; pairs whose segment
    passes through a third node are never read as arrows. The head end is the one with clearly more
    ink just outside its node (the head is a wide triangle, the tail a thin line).
    Unclear cases fail loudly, and so does grey ink that no arrow explains, so an arrow drawn or
    left out against the scene changes what is read, or fails."""
    grey = mask_of(px, canvas.ARROW_GREY)
    covered = ndimage.binary_dilation(grey, structure=np.ones((5, 5), bool))
    unit = radius / 7.0  # node radius is 7 px at 112 px
    pairs = []
    for u in range(len(centers)):
        for v in range(u + 1, len(centers)):
            a, b = centers[u], centers[v]
            if any(_segment_dist(centers[w], a, b) < radius + 2 for w in range(len(centers)) if w not in (u, v)):
                continue
            gap = _longest_gap(covered, a, b, radius + 2.5)
            if gap <= 1:
                pairs.append((u, v))
            else:
                assert gap >= 3, f"unclear arrow between nodes at {a} and {b}: a gap of only {gap} px"
    ys, xs = np.nonzero(grey)
    near_line = {p: _segment_dist((xs, ys), centers[p[0]], centers[p[1]]) for p in pairs}
    stray = np.ones(len(xs), bool)
    for p in pairs:
        stray &= near_line[p] > 3.5 * unit + 1.5  # line and head
    assert not stray.any(), f"{int(stray.sum())} arrow-grey pixels belong to no arrow read, e.g. at {xs[stray][0], ys[stray][0]}"

    edges = []
    near = radius + 1.5 + 3.5 * unit  # just outside a node, where a head is widest
    for p in pairs:
        a, b = centers[p[0]], centers[p[1]]
        d = math.dist(a, b)
        # Where the plain ink count is unclear, an arrow crossing close to a node adds ink there:
        # count again without the lines of the arrows that share no node with this one.
        crossing = np.zeros(len(xs), bool)
        for q in pairs:
            if not set(q) & set(p):
                crossing |= near_line[q] <= unit + 1
        for keep in (np.ones(len(xs), bool), ~crossing):

            def ink(end, toward, keep=keep):
                cx, cy = end[0] + (toward[0] - end[0]) * near / d, end[1] + (toward[1] - end[1]) * near / d
                return int((keep & (np.hypot(xs - cx, ys - cy) <= 2.5 * unit)).sum())

            at_a, at_b = ink(a, b), ink(b, a)
            if max(at_a, at_b) >= 1.3 * max(min(at_a, at_b), 1):
                break
        else:
            raise AssertionError(f"arrowhead unclear between {a} and {b}: ink {at_a} vs {at_b}")
        edges.append(p if at_b > at_a else p[::-1])
    return edges


# ---- one checker per family: (sample, scene) -> (answer, layout) -------------------------------

def check_shape_count(sample, scene):
    px = pixels(sample)
    n = count_inside(px, mask_of(px, BLACK), colour_in_question(sample.question))
    return str(n), n


def check_zoom_count(sample, scene):
    px = pixels(sample)
    n = count_inside(px, mask_of(px, (220, 40, 40)), colour_in_question(sample.question))
    return str(n), n


def check_line_count(sample, scene):
    px = pixels(sample)
    a, b = anchors(px, scene["anchor_rgb"])
    if a[0] > b[0]:
        a, b = b, a
    n = sum(side(d["c"], a, b) < 0 for d in blobs(mask_of(px, colour_in_question(sample.question))))
    return str(n), n  # with a left-to-right AB and y down, side < 0 means above


def check_line_side(sample, scene):
    px = pixels(sample)
    a, b = anchors(px, scene["anchor_rgb"])
    (p,), (q,) = blobs(mask_of(px, (220, 40, 40))), blobs(mask_of(px, (30, 150, 60)))
    same = side(p["c"], a, b) * side(q["c"], a, b) > 0
    angle = abs(math.degrees(math.atan2(b[1] - a[1], b[0] - a[0])))
    angle = min(angle, 180 - angle)
    return ("yes" if same else "no"), int(angle // 5)


def check_label_sum(sample, scene):
    px = pixels(sample)
    white = mask_of(px, WHITE)
    shapes = blobs(mask_of(px, colour_in_question(sample.question)), fill_holes=True)
    digits = [int(read_glyphs(b["mask"] & white, "0123456789")) for b in shapes]
    return str(sum(digits)), len(digits)


def check_zoom_read(sample, scene):
    px = pixels(sample)
    frame = mask_of(px, (220, 40, 40))
    x0, y0, x1, y1 = frame_interior(frame)
    digit = read_glyphs(mask_of(px[y0:y1 + 1, x0:x1 + 1], BLACK), "0123456789")
    h, w = frame.shape
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return digit, (cx >= w / 2 and cy >= h / 2)


def read_graph(px, ring_rgbs, chars) -> tuple[list[str], list[tuple[float, float]], list[tuple[str, str]]]:
    """Node labels, node centres and directed arrows (label pairs), all read from the pixels."""
    centers, radius = graph_nodes(px, ring_rgbs)
    labels = [read_node(px, c, radius, chars) for c in centers]
    assert len(set(labels)) == len(labels), f"repeated node labels {labels}"
    return labels, centers, [(labels[u], labels[v]) for u, v in graph_edges(px, centers, radius)]


def check_arrow_chain(sample, scene):
    labels, _, edges = read_graph(pixels(sample), [BLACK], ARROW_CHAIN_LETTERS)
    start = re.search(r"\b(?:node|at) ([A-Z])\b", sample.question).group(1)
    assert start in labels, f"the question's start node {start} is not drawn"
    path = follow(edges, start)
    return path[-1], len(path) - 1


def check_arrow_label(sample, scene):
    px = pixels(sample)
    labels, centers, edges = read_graph(px, [BLACK, START_RING_RGB], "123456789")
    # The start is the node nearest to the green ring's centroid.
    (ring,) = blobs(mask_of(px, START_RING_RGB), fill_holes=True)
    start = labels[int(np.argmin([math.dist(ring["c"], c) for c in centers]))]
    path = follow(edges, start)
    return str(sum(int(v) for v in path)), len(path) - 1


# ---- the cell-scene families: objects read off the pixels, one per colour ----------------------
QUADRANT_WORDS = ("top left", "top right", "bottom left", "bottom right")


def scene_objects(px) -> list[dict]:
    """Every object-coloured blob: colour name, shape from how much of its bounding box it fills
    (square ~1, disc ~pi/4, triangle ~1/2), quadrant and offset from the quadrant's centre (px)
    from its bounding-box centre, half-width."""
    h, w = px.shape[:2]
    out = []
    for name, rgb in canvas.PALETTE.items():
        for b in blobs(mask_of(px, rgb)):
            x0, y0, x1, y1 = b["bbox"]
            fill = b["area"] / ((x1 - x0 + 1) * (y1 - y0 + 1))
            kind = "square" if fill > 0.92 else "circle" if fill > 0.68 else "triangle"
            cx, cy = (x0 + x1 + 1) / 2, (y0 + y1 + 1) / 2
            col, row = int(cx * 2 // w), int(cy * 2 // h)
            offset = max(abs(cx - (col + 0.5) * w / 2), abs(cy - (row + 0.5) * h / 2))
            out.append({"color": name, "kind": kind, "where": QUADRANT_WORDS[2 * row + col], "col": col,
                        "offset": offset, "half": (x1 - x0 + 1) / 2})
    return out


def _size_band(objects) -> str:
    return "small" if max(o["half"] for o in objects) < 13 else "large"


def _named_colour(question: str, objects) -> dict:
    (o,) = [o for o in objects if re.search(rf"\b{o['color']}\b", question)]
    return o


def check_zoom_color(sample, scene):
    objects = scene_objects(pixels(sample))
    where = re.search(r"object at the ([a-z ]+?)(?: have)?\?", sample.question).group(1)
    (o,) = [o for o in objects if o["where"] == where]
    return o["color"], _size_band(objects)


def check_outline_shape(sample, scene):
    objects = scene_objects(pixels(sample))
    return _named_colour(sample.question, objects)["kind"], _size_band(objects)


def check_point_where(sample, scene):
    objects = scene_objects(pixels(sample))
    return _named_colour(sample.question, objects)["where"], _size_band(objects)


def check_line_left(sample, scene):
    objects = scene_objects(pixels(sample))
    named = sorted((sample.question.index(o["color"]), o) for o in objects if re.search(rf"\b{o['color']}\b", sample.question))
    (_, a), (_, b) = named
    assert a["col"] != b["col"], f"{sample.uid}: the two named objects share a column"
    return (a if a["col"] < b["col"] else b)["color"], _size_band(objects)


CLUTTER_GREYS = ((150, 150, 150), (185, 185, 185), (120, 120, 120))


def clutter_pixels(px) -> int:
    return int(sum(mask_of(px, g).sum() for g in CLUTTER_GREYS))


def _arrow_chain_start(sample):
    labels, centers, _ = read_graph(pixels(sample), [BLACK], ARROW_CHAIN_LETTERS)
    start = re.search(r"\b(?:node|at) ([A-Z])\b", sample.question).group(1)
    return centers[labels.index(start)]


def _arrow_label_start(sample):
    (ring,) = blobs(mask_of(pixels(sample), START_RING_RGB), fill_holes=True)
    return ring["c"]


START_CENTRE = {"arrow_chain": _arrow_chain_start, "arrow_label": _arrow_label_start}  # (x, y) of the start node


CHECKERS = {
    "shape_count": check_shape_count,
    "arrow_chain": check_arrow_chain,
    "line_side": check_line_side,
    "label_sum": check_label_sum,
    "zoom_read": check_zoom_read,
    "zoom_count": check_zoom_count,
    "arrow_label": check_arrow_label,
    "line_count": check_line_count,
    "zoom_color": check_zoom_color,
    "outline_shape": check_outline_shape,
    "point_where": check_point_where,
    "line_left": check_line_left,
}

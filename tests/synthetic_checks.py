"""Independent answer checkers for the synthetic suite.

Each checker re-derives a sample's answer WITHOUT the code path that drew it: from the image
pixels (exact-colour masks, scipy connected components, centroids, template reading of the
bitmap font) and, for arrow graphs, from the scene's edge list with a separately written solver.
Each returns (answer, layout) where `layout` is the held-out property as measured here.
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


def read_node(px, center, radius, chars) -> str:
    """The label drawn in black inside a round node."""
    ink = mask_of(px, BLACK) & disc(px.shape[:2], center, radius + 1)
    # Drop the node's black outline: the one component as wide as the node.
    keep = [b["mask"] for b in blobs(ink) if b["bbox"][2] - b["bbox"][0] < 1.5 * radius]
    return read_glyphs(np.any(keep, axis=0), chars)


def arrow_direction_ok(px, centers, edges, radius) -> bool:
    """The arrowhead (a wide triangle) sits at the target node: more arrow-grey ink just outside the
    target node than just outside the source node, measured along the edge. Lengths scale with the
    node radius (7 px at 112 px)."""
    grey = mask_of(px, canvas.ARROW_GREY)
    unit = radius / 7.0
    for u, v in edges:
        (x0, y0), (x1, y1) = centers[u], centers[v]
        d = math.hypot(x1 - x0, y1 - y0)
        ux, uy = (x1 - x0) / d, (y1 - y0) / d
        near = radius + 1.5 + 3.5 * unit

        def ink(cx, cy):
            return int((grey & disc(grey.shape, (cx, cy), 2.5 * unit)).sum())

        head, tail = ink(x1 - ux * near, y1 - uy * near), ink(x0 + ux * near, y0 + uy * near)
        if head <= tail:
            return False
    return True


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


def check_arrow_chain(sample, scene):
    px = pixels(sample)
    names = list(scene["nodes"])
    centers = [scene["nodes"][n] for n in names]
    for n, c in scene["nodes"].items():  # the letters the scene names are the ones drawn
        assert read_node(px, c, scene["radius"], "ABCDEFGHJKLMNPRSTUVWXYZ") == n, f"node {n} reads differently"
    idx = {n: k for k, n in enumerate(names)}
    assert arrow_direction_ok(px, centers, [(idx[u], idx[v]) for u, v in scene["edges"]], scene["radius"]), "arrowheads"
    start = re.search(r"\b(?:node|at) ([A-Z])\b", sample.question).group(1)
    path = follow(scene["edges"], start)
    return path[-1], len(path) - 1


def check_arrow_label(sample, scene):
    px = pixels(sample)
    centers = [n["center"] for n in scene["nodes"]]
    labels = [read_node(px, c, scene["radius"], "123456789") for c in centers]
    assert labels == [str(n["label"]) for n in scene["nodes"]]
    # The start is the node nearest to the green ring's centroid (measured from pixels).
    (ring,) = blobs(mask_of(px, (30, 150, 60)), fill_holes=True)
    start = labels[int(np.argmin([math.dist(ring["c"], c) for c in centers]))]
    idx = {lab: k for k, lab in enumerate(labels)}
    edges = [(str(u), str(v)) for u, v in scene["edges"]]
    assert arrow_direction_ok(px, centers, [(idx[u], idx[v]) for u, v in edges], scene["radius"]), "arrowheads"
    path = follow(edges, start)
    return str(sum(int(v) for v in path)), len(path) - 1


CHECKERS = {
    "shape_count": check_shape_count,
    "arrow_chain": check_arrow_chain,
    "line_side": check_line_side,
    "label_sum": check_label_sum,
    "zoom_read": check_zoom_read,
    "zoom_count": check_zoom_count,
    "arrow_label": check_arrow_label,
    "line_count": check_line_count,
}

"""Every knob of every synthetic family's `Difficulty` changes what is drawn, as MEASURED from the
pixels (the primitives of `synthetic_checks.py`: exact-colour masks, connected components, the
graph read off the image), under two settings of the knob; the answers stay right under both."""

import math
import os
import sys

import numpy as np
import pytest
from scipy import ndimage

sys.path.insert(0, os.path.dirname(__file__))

import synthetic_checks as sc  # noqa: E402
from atlas_jax.data.synthetic import canvas, generate_with_scene  # noqa: E402
from atlas_jax.data.synthetic.family import SPLITS  # noqa: E402

RED = (220, 40, 40)
DECOY_RGB = (60, 60, 60)


def drawn(task, difficulty, n=4, image_size=None, seed=2):
    """(sample, pixels, held-out layout measured by the checker) of n samples per split under
    `difficulty`; the checker's answer must agree with the sample's."""
    out = []
    for split in SPLITS:
        for i in range(n):
            sample, scene = generate_with_scene(task, split, i, seed=seed, difficulty=difficulty, image_size=image_size)
            answer, layout = sc.CHECKERS[task](sample, scene)
            assert answer == sample.answer, sample.uid
            out.append((sample, sc.pixels(sample), layout))
    return out


def palette_blobs(px):
    """{colour name: blobs} for every palette colour drawn."""
    return {name: sc.blobs(sc.mask_of(px, rgb), fill_holes=True) for name, rgb in canvas.PALETTE.items()}


def inside(blob, box):
    x0, y0, x1, y1 = box
    bx0, by0, bx1, by1 = blob["bbox"]
    return x0 <= bx0 and bx1 <= x1 and y0 <= by0 and by1 <= y1


def half_width(blob):
    return (blob["bbox"][2] - blob["bbox"][0]) / 2




def target_name(sample):
    rgb = sc.colour_in_question(sample.question)
    return next(n for n, c in canvas.PALETTE.items() if c == rgb)


# ---- shape_count ---------------------------------------------------------------------------------

def _shape_count_layout(sample, px):
    box = sc.frame_interior(sc.mask_of(px, sc.BLACK))
    target = target_name(sample)
    found = [(name, b) for name, bs in palette_blobs(px).items() for b in bs]
    return {"inside_distractors": sum(inside(b, box) and name != target for name, b in found),
            "outside": sum(not inside(b, box) for _, b in found),
            "colors": {name for name, _ in found},
            "half_widths": [half_width(b) for _, b in found]}


@pytest.mark.parametrize("inside_distractors,outside_objects", [(0, 0), (4, 9)])
def test_shape_count_object_counts(inside_distractors, outside_objects):
    for sample, px, _ in drawn("shape_count", {"inside_distractors": inside_distractors, "outside_objects": outside_objects}):
        got = _shape_count_layout(sample, px)
        assert (got["inside_distractors"], got["outside"]) == (inside_distractors, outside_objects), sample.uid


@pytest.mark.parametrize("num_colors", [2, 6])
def test_shape_count_colours(num_colors):
    colours = [_shape_count_layout(s, px)["colors"] for s, px, _ in drawn("shape_count", {"num_colors": num_colors, "outside_objects": 9})]
    assert all(len(c) <= num_colors for c in colours) and max(map(len, colours)) == num_colors


@pytest.mark.parametrize("radius", [(2.5, 3.0), (5.5, 6.0)])
def test_shape_count_object_size(radius):
    widths = [w for s, px, _ in drawn("shape_count", {"radius": radius}) for w in _shape_count_layout(s, px)["half_widths"]]
    assert radius[0] - 1 <= min(widths) and max(widths) <= radius[1] + 1, (min(widths), max(widths))


# ---- arrow graphs --------------------------------------------------------------------------------

GRAPH = {"arrow_chain": ([sc.BLACK], sc.ARROW_CHAIN_LETTERS), "arrow_label": ([sc.BLACK, sc.START_RING_RGB], "123456789")}


@pytest.mark.parametrize("task", ["arrow_chain", "arrow_label"])
@pytest.mark.parametrize("setting", ["small", "large"])
def test_arrow_graph_nodes_arrows_and_radius(task, setting):
    num_nodes, prob, radius = {"small": (6, 0.0, 6.5), "large": (7, 1.0, 8.5)}[setting]
    for sample, px, chain in drawn(task, {"num_nodes": num_nodes, "distractor_prob": prob, "radius": radius}):
        _, measured_radius = sc.graph_nodes(px, GRAPH[task][0])
        labels, _, edges = sc.read_graph(px, *GRAPH[task])
        assert len(labels) == num_nodes and abs(measured_radius - radius) <= 0.6, (sample.uid, measured_radius)
        # distractor_prob 0: the chain's arrows only; 1: every node off the chain has one too.
        assert len(edges) == (chain if prob == 0 else num_nodes - 1), (sample.uid, edges)


@pytest.mark.parametrize("task", ["arrow_chain", "arrow_label"])
def test_arrow_node_radius_has_a_floor(task):
    with pytest.raises(ValueError, match=f"{task} Difficulty.radius=6.0; expected >= 6.5"):
        generate_with_scene(task, "train", 0, difficulty={"radius": 6.0})


# ---- line families -------------------------------------------------------------------------------

def _line_distances(px, rgb_list, anchor_rgb=(20, 30, 110)):
    a, b = sc.anchors(px, anchor_rgb)
    return [abs(sc.side(d["c"], a, b)) / math.dist(a, b) for rgb in rgb_list for d in sc.blobs(sc.mask_of(px, rgb))]


def test_line_side_distance_from_the_line():
    def dists(min_line_dist):
        return [d for _, px, _ in drawn("line_side", {"min_line_dist": min_line_dist}, n=6)
                for d in _line_distances(px, [RED, (30, 150, 60)])]

    near, far = dists(2.0), dists(14.0)
    assert min(near) >= 2.0 - 1 and min(far) >= 14.0 - 1
    assert min(near) < 14.0 - 1  # the looser setting really puts points closer


@pytest.mark.parametrize("below,distractors", [(0, 0), (4, 6)])
def test_line_count_dot_counts(below, distractors):
    for sample, px, above in drawn("line_count", {"below": below, "distractors": distractors}):
        target = sc.colour_in_question(sample.question)
        dots = {rgb: len(sc.blobs(sc.mask_of(px, rgb))) for rgb in canvas.PALETTE.values()}
        assert dots[target] == above + below, sample.uid
        assert sum(dots.values()) - dots[target] == distractors, sample.uid


def test_line_count_distance_and_angle():
    def measure(min_line_dist, max_angle_deg):
        dists, angles = [], []
        for _, px, _ in drawn("line_count", {"min_line_dist": min_line_dist, "max_angle_deg": max_angle_deg}, n=6):
            dists += _line_distances(px, list(canvas.PALETTE.values()))
            a, b = sc.anchors(px, (20, 30, 110))
            angle = abs(math.degrees(math.atan2(b[1] - a[1], b[0] - a[0])))
            angles.append(min(angle, 180 - angle))
        return min(dists), max(angles)

    near_flat, far_steep = measure(2.0, 10.0), measure(12.0, 30.0)
    assert near_flat[0] >= 2.0 - 1 and near_flat[1] <= 10.0 + 1, near_flat
    assert far_steep[0] >= 12.0 - 1 and far_steep[1] <= 30.0 + 1, far_steep
    assert near_flat[0] < 12.0 - 1 and far_steep[1] > 10.0 + 1, (near_flat, far_steep)


# ---- label_sum -----------------------------------------------------------------------------------

@pytest.mark.parametrize("distractors,num_colors", [(0, 2), (5, 5)])
def test_label_sum_distractors_and_colours(distractors, num_colors):
    colour_sets = []
    for sample, px, terms in drawn("label_sum", {"distractors": distractors, "num_colors": num_colors}):
        found = {name: len(bs) for name, bs in palette_blobs(px).items() if bs}
        assert sum(found.values()) - found[target_name(sample)] == distractors, sample.uid
        assert terms == found[target_name(sample)]
        colour_sets.append(set(found))
    assert all(len(c) <= num_colors for c in colour_sets)
    assert max(map(len, colour_sets)) == (1 if distractors == 0 else num_colors)


# ---- zoom families -------------------------------------------------------------------------------

def _decoy_digits(px):
    # Digits are single 5x7 glyphs at least 10 px apart: glue each one's strokes, then count.
    return ndimage.label(ndimage.binary_dilation(sc.mask_of(px, DECOY_RGB), np.ones((3, 3))))[1]


@pytest.mark.parametrize("clutter,decoys", [(0, 0), (300, 9)])
def test_zoom_read_clutter_and_decoys(clutter, decoys):
    samples = drawn("zoom_read", {"clutter": clutter, "decoys": decoys})
    for sample, px, _ in samples:
        assert _decoy_digits(px) == decoys, sample.uid
    grey = [sc.clutter_pixels(px) for _, px, _ in samples]
    if clutter == 0:
        assert max(grey) == 0
    else:
        assert min(grey) > 200  # hundreds of strokes and specks, a few pixels each


@pytest.mark.parametrize("inside_distractors,outside_dots,clutter,frame", [(0, 0, 0, 0.25), (4, 20, 250, 0.45)])
def test_zoom_count_dots_clutter_and_frame(inside_distractors, outside_dots, clutter, frame):
    difficulty = {"inside_distractors": inside_distractors, "outside_dots": outside_dots, "clutter": clutter, "frame": frame}
    for sample, px, _ in drawn("zoom_count", difficulty):
        frame_mask = sc.mask_of(px, RED)
        box = sc.frame_interior(frame_mask)
        target = target_name(sample)
        dots = [(name, b) for name, bs in palette_blobs(px).items() if name != "red" for b in bs]
        assert sum(inside(b, box) and name != target for name, b in dots) == inside_distractors, sample.uid
        assert sum(not inside(b, box) for _, b in dots) == outside_dots, sample.uid
        ys, xs = np.nonzero(frame_mask)
        assert abs((xs.max() - xs.min()) - frame * px.shape[1]) <= 2, sample.uid
        assert (sc.clutter_pixels(px) > 0) == (clutter > 0), sample.uid

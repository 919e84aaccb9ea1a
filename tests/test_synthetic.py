"""The synthetic task suite: determinism, answers re-derived independently (pixels / separate
solvers in `synthetic_checks.py`), trajectory format, held-out layouts, image size and mode."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

sys.path.insert(0, os.path.dirname(__file__))

import synthetic_checks  # noqa: E402
from atlas_jax import functional_tokens  # noqa: E402
from atlas_jax.data import synthetic  # noqa: E402
from atlas_jax.data.sample import Sample  # noqa: E402
from atlas_jax.data.synthetic import TASKS, generate, generate_split, generate_with_scene, task_names  # noqa: E402
from atlas_jax.data.synthetic import cell_scene  # noqa: E402
from atlas_jax.data.synthetic.family import SPLITS  # noqa: E402
N = 8  # samples per (task, split) in the per-sample checks
ALL_TOKENS = functional_tokens.token_strings()


def _img_bytes(sample):
    return [im.tobytes() for im in sample.images]


def test_registry_covers_every_operation_and_combos():
    names = list(TASKS)
    assert task_names() == [n for n in names if n not in synthetic.CELL_SCENE_TASKS] and len(task_names()) == 8
    ops = [TASKS[n].ops for n in names]
    for op_tuple in ops:
        functional_tokens.by_name(op_tuple)  # every op is a known functional token
    assert {op for t in ops for op in t} == {t.name for t in functional_tokens.DEFAULT_TOKENS}
    for single in ("manip", "line", "arrow", "shape", "text"):
        assert any(t == (single,) for t in ops), f"no single-operation family for {single}"
    assert sum(len(t) == 2 for t in ops) >= 3
    for n in names:
        assert TASKS[n].held_out, f"{n} does not state its held-out layout"
    assert set(synthetic_checks.CHECKERS) == set(names)


@pytest.mark.parametrize("task", list(TASKS))
def test_deterministic_and_index_addressable(task):
    a, b = generate(task, "train", 7, seed=3), generate(task, "train", 7, seed=3)
    assert _img_bytes(a) == _img_bytes(b)
    assert (a.question, a.response, a.answer, a.uid) == (b.question, b.response, b.answer, b.uid)
    assert a.uid == f"train/{task}/seed=3/i=7"
    other_seed, other_index = generate(task, "train", 7, seed=4), generate(task, "train", 8, seed=3)
    assert _img_bytes(other_seed) != _img_bytes(a) and _img_bytes(other_index) != _img_bytes(a)
    # Index-addressable: the split iterator yields exactly what direct calls give.
    from_split = [s for s in generate_split("train", 8, seed=3, tasks=[task])]
    assert _img_bytes(from_split[7]) == _img_bytes(a) and from_split[7].response == a.response


_FINGERPRINT = """
import hashlib
from atlas_jax.data.synthetic import generate, task_names
h = hashlib.sha256()
for t in task_names():
    s = generate(t, "hard", 4, seed=9)
    h.update(s.images[0].tobytes()); h.update(s.response.encode()); h.update(s.question.encode())
print(h.hexdigest())
"""


def test_identical_across_processes():
    """Nothing depends on per-process state (str hash salting, dict order, global RNG)."""
    digests = set()
    for hash_seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        out = subprocess.run([sys.executable, "-c", _FINGERPRINT], env=env, capture_output=True, text=True, check=True)
        digests.add(out.stdout.strip())
    assert len(digests) == 1 and len(digests.pop()) == 64


@pytest.mark.parametrize("task", list(TASKS))
def test_rendering_uses_exact_colours_only(task):
    """No anti-aliasing or blending: every pixel is white, black, a palette colour or one of the few
    fixed marker/clutter greys. The pixel checkers' exact-colour masks depend on this."""
    from atlas_jax.data.synthetic import canvas

    allowed = {canvas.WHITE, canvas.BLACK, canvas.ARROW_GREY, *canvas.PALETTE.values(),
               (20, 30, 110), (60, 60, 60), (150, 150, 150), (185, 185, 185), (120, 120, 120)}
    for split in SPLITS:
        px = np.asarray(generate(task, split, 1).images[0])
        assert px.dtype == np.uint8
        colours = {tuple(int(v) for v in c) for c in np.unique(px.reshape(-1, 3), axis=0)}
        assert colours <= allowed, f"{task}/{split}: unexpected colours {colours - allowed}"


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("task", list(TASKS))
def test_answers_rederived_independently(task, split):
    check = synthetic_checks.CHECKERS[task]
    for i in range(N):
        sample, scene = generate_with_scene(task, split, i, seed=11)
        got, _ = check(sample, scene)
        assert got == sample.answer, f"{sample.uid}: checker says {got!r}, sample says {sample.answer!r}"


@pytest.mark.parametrize("task", list(TASKS))
def test_trajectory_format(task):
    want = {t.token for t in functional_tokens.by_name(TASKS[task].ops)}
    for split in SPLITS:
        for i in range(4):
            s = generate(task, split, i)
            assert isinstance(s, Sample) and s.task == task
            used = {t for t in ALL_TOKENS if t in s.response}
            assert used == want, f"{s.uid}: tokens {used}, expected {want}"
            # The family's tokens appear in the order of its operations.
            positions = [s.response.index(t.token) for t in functional_tokens.by_name(TASKS[task].ops)]
            assert positions == sorted(positions)
            intent = s.response[: positions[0]].strip()
            assert len(intent.split()) >= 5, f"{s.uid}: no intent sentence before the token"
            assert s.response.endswith("\\boxed{" + s.answer + "}")
            assert re.findall(r"\\boxed\{([^}]*)\}", s.response) == [s.answer]
            reasoning = s.response[s.response.rindex(">") + 1: s.response.rindex("\\boxed")]
            assert len(reasoning.split()) >= 4, f"{s.uid}: no reasoning after the last token"
            assert s.response_answer_only == "\\boxed{" + s.answer + "}"
            assert not any(t in s.response_answer_only or t in s.question for t in ALL_TOKENS)
            assert s.answer and s.question.strip()


# Every answer each family's training split can give (from the counts, digit ranges and letters
# its generator draws; `test_training_answers_stay_in_their_set` checks the sets against samples).
TRAIN_ANSWERS = {
    "shape_count": {"1", "2", "3", "4"}, "zoom_count": {"1", "2", "3"}, "line_count": {"1", "2", "3"},
    "label_sum": {str(v) for v in range(2, 28)},  # 2 or 3 digits 1-9
    "arrow_label": {str(v) for v in range(3, 25)},  # 2 or 3 distinct digits 1-9
    "line_side": {"yes", "no"}, "zoom_read": set("0123456789"), "arrow_chain": set(synthetic_checks.ARROW_CHAIN_LETTERS),
    "zoom_color": set(cell_scene.COLORS), "outline_shape": {"circle", "square", "triangle"},
    "point_where": set(synthetic_checks.QUADRANT_WORDS), "line_left": set(cell_scene.COLORS),
}
# Families whose `hard` answers lie outside the training answer set (the others extrapolate the
# layout: longer chains, steeper lines, more clutter, answered with letters, yes / no or digits).
HARD_ANSWERS_UNSEEN = {"shape_count", "zoom_count", "line_count", "label_sum", "arrow_label"}


@pytest.mark.parametrize("task", list(TASKS))
def test_training_answers_stay_in_their_set(task):
    answers = {generate(task, "train", i, seed=5).answer for i in range(40)}
    assert answers <= TRAIN_ANSWERS[task], (task, answers - TRAIN_ANSWERS[task])
    if len(TRAIN_ANSWERS[task]) <= 4:
        assert answers == TRAIN_ANSWERS[task]


@pytest.mark.parametrize("task", list(TASKS))
def test_headline_answers_are_training_answers_and_hard_ones_are_not(task):
    """in_distribution and shifted answers lie in the training answer set (a model that learned the
    task can answer them); hard answers do not, where the family extrapolates the answer."""
    for i in range(16):
        for split in ("in_distribution", "shifted"):
            sample = generate(task, split, i, seed=5)
            assert sample.answer in TRAIN_ANSWERS[task], sample.uid
        hard = generate(task, "hard", i, seed=5)
        assert (hard.answer in TRAIN_ANSWERS[task]) == (task not in HARD_ANSWERS_UNSEEN), hard.uid


# The layout property each checker MEASURES (count, chain length, number of summed labels,
# line-angle band, frame quadrant) and the condition that takes it outside the training values.
LAYOUT_SHIFTED_BY = {"shape_count": "hard", "zoom_count": "hard", "line_count": "hard", "label_sum": "hard",
                     "arrow_chain": "hard", "arrow_label": "hard", "line_side": "shifted", "zoom_read": "shifted",
                     # the cell-scene families' object size (their shifted objects move off the quadrant's
                     # centre: test_shifted_cell_scenes_move_objects_off_their_quadrant_centre)
                     "zoom_color": "hard", "outline_shape": "hard", "point_where": "hard", "line_left": "hard"}


@pytest.mark.parametrize("task", list(TASKS))
def test_conditions_change_the_measured_layout(task):
    """The measured property never takes a train value under the condition that changes it, and
    in_distribution keeps to the training values (line_side's hard band is outside both)."""
    check = synthetic_checks.CHECKERS[task]
    seen = {split: {check(*generate_with_scene(task, split, i, seed=5))[1] for i in range(12)} for split in SPLITS}
    train = seen["train"] | {check(*generate_with_scene(task, "train", i, seed=6))[1] for i in range(24)}
    changed = LAYOUT_SHIFTED_BY[task]
    assert seen[changed] and not train & seen[changed], (task, seen)
    if task == "line_side":
        assert not train & seen["hard"] and not seen["shifted"] & seen["hard"], seen
    if task not in ("line_side",):  # line_side's angle bins are too many to cover in 36 samples
        assert seen["in_distribution"] <= train, (task, seen)


SHIFTED_COLOURS = {"shape_count": {"cyan", "pink", "brown"}, "label_sum": {"cyan", "pink", "brown"},
                   "zoom_count": {"cyan", "pink"}, "line_count": {"cyan", "pink"}}


@pytest.mark.parametrize("task", sorted(SHIFTED_COLOURS))
def test_shifted_colours_are_never_drawn_elsewhere(task):
    """The shift of the colour families, measured from pixels: the colour asked about in `shifted`
    is one that no train (nor in_distribution, nor hard) image contains at all."""
    from atlas_jax.data.synthetic import canvas

    held_out = SHIFTED_COLOURS[task]
    for split in SPLITS:
        for i in range(12):
            sample = generate(task, split, i, seed=5)
            px = synthetic_checks.pixels(sample)
            drawn = {name for name, rgb in canvas.PALETTE.items() if synthetic_checks.mask_of(px, rgb).any()}
            target_rgb = synthetic_checks.colour_in_question(sample.question)
            target = next(name for name, rgb in canvas.PALETTE.items() if rgb == target_rgb)
            assert target in drawn, sample.uid
            if split == "shifted":
                assert target in held_out, (sample.uid, target)
            else:
                assert not drawn & held_out, (sample.uid, drawn)


@pytest.mark.parametrize("task", ["arrow_chain", "arrow_label"])
def test_shifted_arrow_chains_start_in_the_unseen_quadrant(task):
    """Measured from pixels: the start node sits in the bottom-right quadrant in `shifted` only."""
    for split in SPLITS:
        for i in range(8):
            sample = generate(task, split, i, seed=5)
            x, y = synthetic_checks.START_CENTRE[task](sample)
            size = sample.images[0].width
            assert (x >= size / 2 and y >= size / 2) == (split == "shifted"), (sample.uid, x, y)


def test_hard_zoom_read_has_more_clutter_than_any_training_image():
    def grey(split):
        return [synthetic_checks.clutter_pixels(synthetic_checks.pixels(generate("zoom_read", split, i, seed=5)))
                for i in range(12)]

    train, hard = grey("train"), grey("hard")
    assert min(hard) > 1.5 * max(train), (train, hard)
    assert max(grey("in_distribution")) < min(hard) and max(grey("shifted")) < min(hard)


@pytest.mark.parametrize("task", synthetic.CELL_SCENE_TASKS)
def test_shifted_cell_scenes_move_objects_off_their_quadrant_centre(task):
    """Offsets from the quadrant's centre measured from the pixels: every shifted object is further
    off than any training one, and in_distribution keeps to the training offsets."""
    def offsets(split):
        return [o["offset"] for i in range(12)
                for o in synthetic_checks.scene_objects(synthetic_checks.pixels(generate(task, split, i, seed=5)))]

    train = offsets("train")
    assert min(offsets("shifted")) > max(train), (min(offsets("shifted")), max(train))
    assert max(offsets("in_distribution")) <= 5 and max(train) <= 5  # 4 px drawn, +-1 px of rounding


@pytest.mark.parametrize("task", list(TASKS))
def test_image_size_and_mode(task):
    s = generate(task, "in_distribution", 2)
    assert len(s.images) == 1 and s.images[0].mode == "RGB" and s.images[0].size == (112, 112)
    for size in (TASKS[task].min_image_size, 168):  # layouts scale, answers still hold
        other, scene = generate_with_scene(task, "hard", 2, image_size=size)
        assert other.images[0].mode == "RGB" and other.images[0].size == (size, size)
        assert synthetic_checks.CHECKERS[task](other, scene)[0] == other.answer
    json.dumps(scene)  # scenes are plain data (storable next to the sample)


def test_generate_split_interleaves_tasks():
    tasks = ["line_side", "shape_count", "zoom_read"]
    out = list(generate_split("shifted", 3, seed=2, tasks=tasks, image_size=84))
    assert [s.task for s in out] == tasks * 3
    assert len({s.uid for s in out}) == 9 and all(s.images[0].size == (84, 84) for s in out)
    assert len(list(generate_split("hard", 1))) == len(task_names())


def test_difficulty_overrides_and_errors():
    spec = TASKS["shape_count"]
    _, scene = generate_with_scene("shape_count", "train", 0, difficulty={"outside_objects": 0, "inside_distractors": 0})
    assert all(o["inside"] for o in scene["objects"]) and len(scene["objects"]) == scene["count"]
    harder = dataclasses.replace(spec.difficulty, outside_objects=8)
    _, scene = generate_with_scene("shape_count", "train", 0, difficulty=harder)
    assert sum(not o["inside"] for o in scene["objects"]) == 8
    with pytest.raises(ValueError, match="outside_objectz"):
        generate("shape_count", "train", 0, difficulty={"outside_objectz": 1})
    with pytest.raises(ValueError, match="no_such_task"):
        generate("no_such_task", "train", 0)
    with pytest.raises(ValueError, match="split 'dev'"):
        generate("shape_count", "dev", 0)
    with pytest.raises(ValueError, match="image_size"):
        generate("shape_count", "train", 0, image_size=100)
    with pytest.raises(ValueError, match="image_size for task 'arrow_chain'.*>= 112"):
        generate("arrow_chain", "train", 0, image_size=84)
    with pytest.raises(ValueError, match="num_colors"):
        generate("shape_count", "train", 0, difficulty={"num_colors": 1})
    with pytest.raises(ValueError, match="num_nodes"):
        generate("arrow_label", "hard", 0, difficulty={"num_nodes": 4})  # hard chains need 5 nodes
    with pytest.raises(TypeError, match="difficulty"):
        generate("line_side", "train", 0, difficulty=3)
    with pytest.raises(ValueError, match="index"):
        generate("shape_count", "train", -1)


# ---- the arrow checkers read the graph from the pixels, not from the scene ------------------------

def _scene_graph(task, scene):
    """(label -> centre, labelled edges, chain) as the generator says it drew them."""
    if task == "arrow_chain":
        centers = {n: tuple(c) for n, c in scene["nodes"].items()}
        edges = [tuple(e) for e in scene["edges"]]
    else:
        centers = {str(n["label"]): tuple(n["center"]) for n in scene["nodes"]}
        edges = [(str(u), str(v)) for u, v in scene["edges"]]
    return centers, edges, synthetic_checks.follow(edges, str(scene["start"]))


READ_GRAPH = {"arrow_chain": ([synthetic_checks.BLACK], synthetic_checks.ARROW_CHAIN_LETTERS),
              "arrow_label": ([synthetic_checks.BLACK, synthetic_checks.START_RING_RGB], "123456789")}


@pytest.mark.parametrize("task", ["arrow_chain", "arrow_label"])
def test_arrow_graph_read_from_pixels_is_the_drawn_one(task):
    for split in SPLITS:
        for i in range(6):
            sample, scene = generate_with_scene(task, split, i, seed=21, image_size=112 if i % 2 else 168)
            labels, centers, edges = synthetic_checks.read_graph(synthetic_checks.pixels(sample), *READ_GRAPH[task])
            want_centers, want_edges, _ = _scene_graph(task, scene)
            assert sorted(edges) == sorted(want_edges), sample.uid
            for label, c in zip(labels, centers):
                assert np.hypot(*np.subtract(c, want_centers[label])) < 1.0, (sample.uid, label)


def _clear_of_nodes(centers, a, b, radius):
    return all(synthetic_checks._segment_dist(c, centers[a], centers[b]) > 2 * radius
               for n, c in centers.items() if n not in (a, b))


@pytest.mark.parametrize("task", ["arrow_chain", "arrow_label"])
def test_arrow_checkers_see_an_extra_or_a_missing_arrow(task):
    """Redraw an image with one arrow more (from the chain's end onwards) or one fewer (the chain's
    last one erased): the checker's answer follows the pixels, not the unchanged scene."""
    from PIL import ImageDraw

    from atlas_jax.data.synthetic import canvas
    from atlas_jax.data.synthetic.graph_layout import draw_graph

    check = synthetic_checks.CHECKERS[task]

    def answer_for(path):
        return path[-1] if task == "arrow_chain" else str(sum(int(v) for v in path))

    extra = missing = False
    for i in range(40):
        sample, scene = generate_with_scene(task, "train", i, seed=3)
        centers, edges, chain = _scene_graph(task, scene)
        radius = scene["radius"]
        end = chain[-1]
        # One more arrow: from the end of the chain to a node whose own path does not come back.
        targets = [n for n in centers if end not in synthetic_checks.follow(edges, n)
                   and _clear_of_nodes(centers, end, n, radius)]
        if targets and not extra:
            image = sample.images[0].copy()
            draw_graph(ImageDraw.Draw(image), [centers[end], centers[targets[0]]], [(0, 1)], radius, 1.0)
            path = synthetic_checks.follow(edges + [(end, targets[0])], chain[0])
            got = check(dataclasses.replace(sample, images=[image]), scene)
            assert got == (answer_for(path), len(path) - 1) and got[0] != sample.answer, sample.uid
            extra = True
        # One fewer: erase the last chain arrow, if it touches no other arrow.
        px = np.asarray(sample.images[0]).copy()
        arrows, _ = ndimage.label(np.all(px == canvas.ARROW_GREY, -1), structure=np.ones((3, 3)))
        (x0, y0), (x1, y1) = centers[chain[-2]], centers[chain[-1]]
        ids = set(np.unique(arrows[round((y0 + y1) / 2) - 2:round((y0 + y1) / 2) + 3,
                                   round((x0 + x1) / 2) - 2:round((x0 + x1) / 2) + 3])) - {0}
        if len(chain) > 2 and not missing and len(ids) == 1:
            ys, xs = np.nonzero(arrows == ids.pop())
            if synthetic_checks._segment_dist((xs, ys), centers[chain[-2]], centers[chain[-1]]).max() <= 3.5 + 1.5:
                px[ys, xs] = canvas.WHITE
                got = check(dataclasses.replace(sample, images=[Image.fromarray(px)]), scene)
                assert got == (answer_for(chain[:-1]), len(chain) - 2) and got[0] != sample.answer, sample.uid
                missing = True
        if extra and missing:
            return
    pytest.fail(f"no suitable {task} sample for the mutation checks (extra={extra}, missing={missing})")


def test_training_stream_is_unlimited_reproducible_and_never_repeats():
    """The on-the-fly training source: record i is sample i // T of task i % T; the pipeline's
    shuffled stream over it repeats no example and is the same for the same seed."""
    from atlas_jax.data import pipeline
    from atlas_jax.data.synthetic import SyntheticSource

    src = SyntheticSource("train", None, seed=3)
    assert len(src) >= 2**40
    names = task_names()
    want = generate(names[2], "train", 5, seed=3)
    got = src[5 * len(names) + 2]
    assert (got["uid"], got["answer"], got["response"]) == (want.uid, want.answer, want.response)

    def stream(seed, n=96):
        cfg = pipeline.PipelineConfig(batch_size=8, max_length=64, max_patches=64, seed=seed)
        ds = pipeline.global_stream(src, cfg, process_index=0, process_count=1)
        return [ds[i][1]["uid"] for i in range(n)]

    first = stream(0)
    assert len(set(first)) == len(first) and {u.split("/")[1] for u in first} == set(names)
    assert stream(0) == first and stream(1) != first
    with pytest.raises(ValueError, match="num_per_task"):
        SyntheticSource("shifted", 0)
    finite = SyntheticSource("shifted", 2, seed=3)
    assert len(finite) == 2 * len(names) and finite[len(names)]["uid"] == f"shifted/{names[0]}/seed=3/i=1"

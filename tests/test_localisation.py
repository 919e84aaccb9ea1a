"""The localisation metric: how much of a visual-op module's attention lands on the object the
generator knows the question is about (`heatmaps.target_tokens`, `heatmaps.localisation`), the
target box the cell-scene families carry through their records, and the metric's fields in an
evaluation of the tiny model."""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atlas_jax import builders, heatmaps, run_config
from atlas_jax.data import records
from atlas_jax.data.sample import BadRecordError
from atlas_jax.data.synthetic import CELL_SCENE_TASKS, canvas, cell_scene, generate_with_scene
from atlas_jax.jobs import evaluate, results as results_lib

GRID = (4, 4)  # a 112-px image: 8 x 8 patches of 14 px, merged 2 x 2


def _quadrant_tokens(cell: int) -> set[int]:
    """The 2 x 2 merged tokens (row-major over the 4 x 4 grid) of quadrant `cell` (row-major over 2 x 2)."""
    row, col = divmod(cell, 2)
    return {(2 * row + r) * 4 + 2 * col + k for r in (0, 1) for k in (0, 1)}


# ---------------------------------------------------------------- the metric on constructed maps


def test_target_tokens_by_hand():
    on = lambda box, size=(112, 112), grid=GRID: set(np.flatnonzero(heatmaps.target_tokens(box, size, grid)).tolist())
    assert on((7, 11, 43, 47)) == {0, 1, 4, 5}  # straddles x = 28 and y = 28: the top-left quadrant's tokens
    assert on((30, 30, 50, 50)) == {5}  # inside token (1, 1) = pixels [28, 56)^2
    assert on((28, 0, 56, 28)) == {1}  # ends exclusive: touching token 2's first column is not overlapping it
    assert on((84, 84, 112, 112)) == {15}
    assert on((0, 0, 112, 112)) == set(range(16))
    # A 224-px image whose processor grid is still 4 x 4 merged tokens: the box scales with it.
    assert on((60, 60, 100, 100), size=(224, 224)) == {5}
    assert on((60, 0, 100, 30), size=(224, 112), grid=(2, 4)) == {1}  # 56-px wide, 56-px tall tokens


def test_localisation_of_known_maps():
    region = heatmaps.target_tokens((7, 11, 43, 47), (112, 112), GRID)  # tokens 0, 1, 4, 5
    on_target = np.where(region, 0.25, 0.0)
    assert heatmaps.localisation(on_target, region) == {"share": 1.0, "chance": 0.25, "hit": True}
    uniform = heatmaps.localisation(np.full(16, 1 / 16), region)
    assert uniform["share"] == pytest.approx(uniform["chance"]) and uniform["chance"] == 0.25
    off = np.zeros(16)
    off[15] = 1.0
    assert heatmaps.localisation(off, region) == {"share": 0.0, "chance": 0.25, "hit": False}
    mixed = np.zeros(16)
    mixed[[0, 5, 10, 15]] = [0.1, 0.2, 0.4, 0.3]  # half a share on the region, argmax (token 10) off it
    found = heatmaps.localisation(mixed, region)
    assert found["share"] == pytest.approx(0.3) and not found["hit"]
    # Unnormalised attention (e.g. the first image's part of a two-image sample): the share within it.
    assert heatmaps.localisation(on_target * 0.5 + np.where(region, 0.0, 0.125 / 12), region)["share"] == pytest.approx(0.5 / 0.625)
    with pytest.raises(ValueError, match="region"):
        heatmaps.localisation(np.ones(16), np.zeros(16, bool))


def test_recipe_summary_averages_the_measured_rows():
    rows = [{"task": "a", "correct": 1.0, "op_target_share": 0.5, "op_target_chance": 0.25, "op_target_hit": True},
            {"task": "a", "correct": 0.0},  # no functional token: not measured
            {"task": "b", "correct": 0.0, "op_target_share": 0.1, "op_target_chance": 0.25, "op_target_hit": False},
            {"task": "c", "correct": 1.0}]
    s = results_lib.summary(rows)
    assert (s["op_target_count"], s["op_target_share"], s["op_target_chance"], s["op_target_hit"]) == (2, pytest.approx(0.3), 0.25, 0.5)
    assert (s["per_family"]["a"]["op_target_count"], s["per_family"]["a"]["op_target_hit"]) == (1, 1.0)
    assert "op_target_share" not in s["per_family"]["c"] and "op_target_count" not in s["per_family"]["c"]
    assert "op_target_count" not in results_lib.summary([{"task": "a", "correct": 1.0}])  # as before the metric


# ---------------------------------------------------------------- the region against the drawn pixels


def _named_colours(sample) -> list[str]:
    return [c for c in cell_scene.COLORS if f" {c} " in f" {sample.question} "]


@pytest.mark.parametrize("task", CELL_SCENE_TASKS)
@pytest.mark.parametrize("split", ["train", "in_distribution", "shifted", "hard"])
def test_target_box_holds_the_targets_pixels_and_its_tokens_are_its_quadrants(task, split):
    for index in range(40):
        sample, scene = generate_with_scene(task, split, index)
        px = np.asarray(sample.images[0].convert("RGB"))
        objects = scene["objects"]
        target = objects[scene["target"] if "target" in scene else scene["first"]]
        if task == "zoom_color":
            assert target["where"] in sample.question
        elif task == "line_left":  # the line is drawn through the first colour the question names
            assert sample.question.index(target["color"]) == min(sample.question.index(c) for c in _named_colours(sample))
        else:
            assert _named_colours(sample) == [target["color"]]
        x0, y0, x1, y1 = sample.target_box
        ys, xs = np.nonzero((px == canvas.PALETTE[target["color"]]).all(axis=-1))
        assert len(xs) > 20, f"{sample.uid}: the target is drawn"
        # The box is the drawing's own: every pixel of the target in it, touching each of its sides.
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1), sample.uid
        region = heatmaps.target_tokens(sample.target_box, sample.images[0].size, GRID)
        assert set(np.flatnonzero(region).tolist()) == _quadrant_tokens(target["cell"]), sample.uid
        # No other object's pixel is in the target's region (each object has a quadrant of its own).
        token_of = (ys // 28) * 4 + xs // 28
        assert region[token_of].all()
        for other in objects:
            if other is not target:
                oy, ox = np.nonzero((px == canvas.PALETTE[other["color"]]).all(axis=-1))
                assert not region[(oy // 28) * 4 + ox // 28].any(), sample.uid


def test_target_box_travels_through_the_record():
    for task in CELL_SCENE_TASKS:
        sample, _ = generate_with_scene(task, "in_distribution", 3)
        record = records.encode_sample(sample)
        assert record[records.TARGET_BOX_FIELD] == list(sample.target_box) and len(sample.target_box) == 4
        assert records.decode_record(record, "gen", sample.uid).target_box == sample.target_box
    plain, _ = generate_with_scene("shape_count", "in_distribution", 3)  # no target: the record is as before
    assert plain.target_box == () and records.TARGET_BOX_FIELD not in records.encode_sample(plain)
    bad = dict(records.encode_sample(sample), target_box=[10, 5, 3, 20])
    with pytest.raises(BadRecordError, match=r"field 'target_box': expected \[x0, y0, x1, y1\]"):
        records.decode_record(bad, "unit.jsonl", 7)


# ---------------------------------------------------------------- end to end on the tiny model


def _recipe_config(**over):
    path = os.path.join(os.path.dirname(__file__), "..", "configs", "atlas_synthetic.py")
    spec = importlib.util.spec_from_file_location("atlas_synthetic", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return run_config.apply_overrides(mod.get_config("module"), over)


def test_evaluation_scores_where_the_first_functional_tokens_module_looked(tmp_path, monkeypatch):
    c = _recipe_config(**{"eval.num_per_task": 4, "eval.num_per_task_by_condition.in_distribution": 4, "eval.batch_size": 8,
                          "eval.max_new_tokens": 12, "eval.heatmaps": 8, "mesh": (2, 2, 2)})
    mesh = builders.make_mesh(c)
    policy = builders.load_policy(c, str(tmp_path), mesh)  # the perception-pretrained start, modules added
    # An output head that only knows <|Manip|> (logit h.w) and token 0 (logit 0): greedy decoding then
    # emits <|Manip|> wherever h.w > 0, so most completions hold one, at varied steps.
    kernel = policy.params["lm_head"]["kernel"]
    w = jax.random.normal(jax.random.key(0), (kernel[...].shape[0],))
    kernel[...] = jnp.zeros_like(kernel[...]).at[:, policy.tokens.functional_ids[0]].set(w)
    kept = {}  # what the heat maps got from the sampler, an independent read of the same attention
    draw = evaluate._HeatMaps.draw

    def keep_and_draw(self, *args, **kw):
        kept.update(self.generated)
        return draw(self, *args, **kw)

    monkeypatch.setattr(evaluate._HeatMaps, "draw", keep_and_draw)

    results = evaluate.evaluate(policy, c, str(tmp_path), mesh, tag="loc", split="in_distribution")

    with open(tmp_path / "eval_loc.json") as f:
        written = json.load(f)
    assert written["results"] == results
    measured = [row for row in written["samples"] if "op_target_share" in row]
    manip = "<|Manip|>"
    # Every completion with a functional token is measured, but one whose only one is its last token
    # (the sampler never fed it back, so its module never ran).
    with_map = [row["uid"] for row in written["samples"]
                if manip in row["completion"] and row["completion"] != row["completion"].split(manip)[0] + manip]
    assert [row["uid"] for row in measured] == with_map
    assert 4 <= len(measured) < len(written["samples"]) == 16
    assert results["op_target_count"] == len(measured)
    for task in CELL_SCENE_TASKS:
        rows = [row for row in measured if row["task"] == task]
        assert results[f"op_target_count/{task}"] == len(rows)
        if rows:
            assert results[f"op_target_share/{task}"] == pytest.approx(np.mean([row["op_target_share"] for row in rows]))
            assert results[f"op_target_hit/{task}"] == pytest.approx(np.mean([row["op_target_hit"] for row in rows]))
    for row in measured:
        assert 0.0 <= row["op_target_share"] <= 1.0 and isinstance(row["op_target_hit"], bool)
        assert row["op_target_chance"] == 0.25  # a quadrant of a 4 x 4 grid
        assert 0.0 <= results["op_target_share"] <= 1.0 and 0.0 <= results["op_target_hit"] <= 1.0
    # Recomputed from the heat maps' copy of the sampler's attention and the scene's target quadrant.
    checked = 0
    for row in measured:
        if row["uid"] not in kept:
            continue
        split, task, seed, index = row["uid"].split("/")
        _, scene = generate_with_scene(task, split, int(index.split("=")[1]), int(seed.split("=")[1]))
        target = scene["objects"][scene["target"] if "target" in scene else scene["first"]]
        _, _, op, attn = kept[row["uid"]]
        first = attn[np.flatnonzero(op >= 0)[0], :16]
        tokens = sorted(_quadrant_tokens(target["cell"]))
        assert row["op_target_share"] == pytest.approx(first[tokens].sum() / first.sum(), abs=1e-6)
        assert row["op_target_hit"] == (int(np.argmax(first)) in tokens)
        checked += 1
    assert checked >= 3

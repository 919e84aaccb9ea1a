"""The task registry and the index-addressable generation API.

`generate(task, split, index, seed)` is a pure function of its arguments: the RNG is seeded from
(seed, split, task, index) alone, so sample i never depends on samples 0..i-1 and data can be made
in parallel shards or resumed anywhere.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from atlas_jax.data.sample import Sample
from atlas_jax.data.synthetic import (arrow_chain, arrow_label, canvas, label_sum, line_count, line_left, line_side,
                                      outline_shape, point_where, shape_count, zoom_color, zoom_count, zoom_read)
from atlas_jax.data.synthetic.family import SPLITS, Drawn

DEFAULT_IMAGE_SIZE = 112
_SPLIT_CODE = {name: k for k, name in enumerate(SPLITS)}
_PLACEMENT_ATTEMPTS = 8


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """build(rng, split, difficulty, image_size) -> Drawn; ops: functional-token names the
    trajectory uses, in order; held_out: what the evaluation conditions change (the docstring's
    "Held-out conditions:" paragraph);
    min_image_size: below it the family's labels no longer fit legibly."""

    name: str
    build: Callable[[np.random.Generator, str, Any, int], Drawn]
    ops: tuple[str, ...]
    difficulty: Any
    held_out: str
    min_image_size: int = 84


def _spec(name: str, module, ops: tuple[str, ...], min_image_size: int = 84) -> TaskSpec:
    paragraph = (module.__doc__ or "").split("Held-out conditions", 1)[-1].split("\n\n", 1)[0]
    held_out = " ".join(paragraph.split()).lstrip(": ")
    return TaskSpec(name, module.build, ops, module.Difficulty(), held_out, min_image_size)


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        _spec("shape_count", shape_count, ("shape",)),
        _spec("arrow_chain", arrow_chain, ("arrow",), min_image_size=112),
        _spec("line_side", line_side, ("line",)),
        _spec("label_sum", label_sum, ("text",)),
        _spec("zoom_read", zoom_read, ("manip",)),
        _spec("zoom_count", zoom_count, ("manip", "shape")),
        _spec("arrow_label", arrow_label, ("arrow", "text"), min_image_size=112),
        _spec("line_count", line_count, ("line", "shape")),
        # What the perception-pretrained start can see, composed (`cell_scene`): the main job's families.
        _spec("zoom_color", zoom_color, ("manip",)),
        _spec("outline_shape", outline_shape, ("shape",)),
        _spec("point_where", point_where, ("arrow",)),
        _spec("line_left", line_left, ("line",)),
    )
}
CELL_SCENE_TASKS = ("zoom_color", "outline_shape", "point_where", "line_left")
# The suite a source holds when no families are named (`data.tasks=()`): the eight original ones,
# so stored datasets and the runs built on them are unchanged by the families added for the main job.
DEFAULT_TASKS = tuple(name for name in TASKS if name not in CELL_SCENE_TASKS)


def task_names() -> list[str]:
    """The default suite (`DEFAULT_TASKS`); every family the registry can generate is in `TASKS`."""
    return list(DEFAULT_TASKS)


def _difficulty(spec: TaskSpec, difficulty) -> Any:
    if difficulty is None:
        return spec.difficulty
    if isinstance(difficulty, type(spec.difficulty)):
        return difficulty
    if isinstance(difficulty, dict):
        known = {f.name for f in dataclasses.fields(spec.difficulty)}
        unknown = sorted(set(difficulty) - known)
        if unknown:
            raise ValueError(f"difficulty for task {spec.name!r} has unknown fields {unknown}; expected some of {sorted(known)}")
        return dataclasses.replace(spec.difficulty, **difficulty)
    raise TypeError(f"difficulty for task {spec.name!r} must be None, a dict or "
                    f"{type(spec.difficulty).__module__}.Difficulty; got {type(difficulty).__name__}")


def _check(task: str, split: str, index: int, image_size: int) -> None:
    if task not in TASKS:
        raise ValueError(f"task {task!r} is unknown; expected one of {list(TASKS)}")
    if split not in _SPLIT_CODE:
        raise ValueError(f"split {split!r} is unknown; expected one of {list(SPLITS)}")
    if not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"index must be a non-negative integer; got {index!r}")
    low = TASKS[task].min_image_size
    if image_size % 28 or image_size < low:
        raise ValueError(f"image_size for task {task!r} must be a multiple of 28 (two 14-px patches) and >= {low}; "
                         f"got {image_size}")


def generate_with_scene(task: str, split: str, index: int, seed: int = 0, difficulty=None,
                        image_size: int | None = None) -> tuple[Sample, dict[str, Any]]:
    """Like `generate`, plus the scene dict the image was drawn from (for independent checks)."""
    image_size = DEFAULT_IMAGE_SIZE if image_size is None else int(image_size)
    _check(task, split, index, image_size)
    spec = TASKS[task]
    diff = _difficulty(spec, difficulty)
    last_error = None
    for attempt in range(_PLACEMENT_ATTEMPTS):
        # crc32, not hash(): Python salts str hashes per process.
        rng = np.random.default_rng([int(seed), _SPLIT_CODE[split], zlib.crc32(task.encode()), int(index), attempt])
        try:
            drawn = spec.build(rng, split, diff, image_size)
            break
        except canvas.PlacementError as e:
            last_error = e
    else:
        raise canvas.PlacementError(f"task {task!r}, {split}/{index}, difficulty {diff}: {last_error}")
    sample = Sample(images=[drawn.image], question=drawn.question, response=drawn.response, answer=drawn.answer,
                    task=task, response_answer_only="\\boxed{" + drawn.answer + "}",
                    uid=f"{split}/{task}/seed={seed}/i={index}", target_box=tuple(drawn.target_box or ()))
    scene = dict(drawn.scene, image_size=image_size, split=split)
    return sample, scene


def generate(task: str, split: str, index: int, seed: int = 0, difficulty=None, image_size: int | None = None) -> Sample:
    """Sample `index` of `task` in `split`; identical arguments give byte-identical images and text."""
    return generate_with_scene(task, split, index, seed, difficulty, image_size)[0]


def generate_split(split: str, num_per_task: int, seed: int = 0, tasks: Sequence[str] | None = None,
                   image_size: int | None = None) -> Iterator[Sample]:
    """num_per_task samples of every task, interleaved (index-major) so any prefix covers all tasks."""
    names = task_names() if tasks is None else list(tasks)
    for name in names:
        if name not in TASKS:
            raise ValueError(f"task {name!r} is unknown; expected one of {list(TASKS)}")
    for index in range(num_per_task):
        for name in names:
            yield generate(name, split, index, seed, image_size=image_size)

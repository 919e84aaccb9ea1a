"""What every task family returns, and the small phrasing helpers their trajectories share."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
from PIL import Image

# Evaluation conditions: `in_distribution` (fresh seeds, the training settings) and `shifted` (one
# mild change, answers still in the training answer set) are the headline; `hard` extrapolates
# (e.g. counts never trained on) and is reported apart.
EVAL_CONDITIONS = ("in_distribution", "shifted", "hard")
SPLITS = ("train",) + EVAL_CONDITIONS


@dataclasses.dataclass
class Drawn:
    """One generated example before it becomes a `Sample`.

    scene: the JSON-like description the image was drawn from (positions in pixels, colours,
    graph edges, ...); tests re-derive the answer from it (or from the pixels) independently.
    target_box: the pixel box (x0, y0, x1, y1), ends exclusive, of the one object the trajectory's
    functional token acts on, where a family has one (the cell-scene families); None elsewhere.
    It travels with the record (`records.TARGET_BOX_FIELD`) so evaluation can measure whether a
    visual-op module attends to that object (`heatmaps.localisation`).
    """

    image: Image.Image
    question: str
    response: str
    answer: str
    scene: dict[str, Any]
    target_box: tuple[int, int, int, int] | None = None


def pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def join_words(items: Sequence[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def by_condition(train, *, shifted=None, hard=None) -> dict[str, Any]:
    """A generator setting per split: in_distribution uses the training one; shifted and hard use
    theirs where given, else the training one."""
    return {"train": train, "in_distribution": train, "shifted": train if shifted is None else shifted,
            "hard": train if hard is None else hard}


def split_colors(rng: np.random.Generator, split: str, n: int, pool: Sequence[str], held_out: Sequence[str]) -> list[str]:
    """n distinct colour names, the target first. Every split but `shifted` draws them all from
    `pool`, so the `held_out` colours never appear in training images; `shifted` takes the target
    from `held_out` (an unseen colour to count or add) and the others from `pool`."""
    if split != "shifted":
        return [str(c) for c in rng.choice(list(pool), size=n, replace=False)]
    return [pick(rng, held_out)] + [str(c) for c in rng.choice(list(pool), size=n - 1, replace=False)]


def in_bottom_right(x: float, y: float, size: int) -> bool:
    """The quadrant that the `shifted` condition of the layout-shift families moves things into."""
    return x >= size / 2 and y >= size / 2


def boxed(answer: str) -> str:
    return "\\boxed{" + answer + "}"


def scale_of(image_size: int) -> float:
    """Layouts are designed at 112 px and scaled linearly."""
    return image_size / 112.0


def require(ok: bool, task: str, field: str, expected: str, got) -> None:
    """Rejects a difficulty setting early, naming the task and field."""
    if not ok:
        raise ValueError(f"{task} Difficulty.{field}={got!r}; expected {expected}")

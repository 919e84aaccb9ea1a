"""The built-in synthetic ATLAS task suite: procedural images, trajectories with functional tokens,
and exact answers, deterministic by seed (same arguments -> byte-identical images and text).

Splits: `train` (the generator settings trained on; streamed without end by `SyntheticSource`)
and three evaluation conditions. `in_distribution` (fresh seeds, training settings) and `shifted`
(one mild change; answers stay in the training answer set) are the headline; `hard` extrapolates
and is reported apart.

    family        tokens                  shifted                          hard
    shape_count   <|Shape|>               target colour never drawn        5-6 targets (train 1-4)
    arrow_chain   <|Arrow|>               start in the bottom-right        4-5 arrows (train 1-3)
    line_side     <|Line|>                AB at 45-60 deg (train 0-35)     70-88 deg, near vertical
    label_sum     <|Text|>                target colour never drawn        4-5 labels, sum 28-45 (train <= 27)
    zoom_read     <|Manip|>               frame in the bottom-right        twice the clutter
    zoom_count    <|Manip|> <|Shape|>     target colour never drawn        4-5 dots (train 1-3)
    arrow_label   <|Arrow|> <|Text|>      start in the bottom-right        3-4 arrows, sum 25-35 (train <= 24)
    line_count    <|Line|> <|Shape|>      target colour never drawn        4-5 dots above (train 1-3)

Four more (`CELL_SCENE_TASKS`, the main job's) compose what the tiny perception-pretrained start
reads, an object's colour, shape and quadrant (`cell_scene.py`); shifted: objects off their
quadrant's centre; hard: objects half the trained size:

    zoom_color     <|Manip|>   the colour of the object in a named quadrant
    outline_shape  <|Shape|>   the shape of the object of a named colour
    point_where    <|Arrow|>   the quadrant of the object of a named colour
    line_left      <|Line|>    which of two named objects is further left

    sample = generate("arrow_chain", "train", index=17, seed=0)          # one Sample
    for s in generate_split("shifted", num_per_task=100): ...            # all tasks, interleaved
    sample, scene = generate_with_scene("shape_count", "hard", 3)        # + what was drawn

Each family is one module (`Difficulty` dataclass + `build`); `registry.py` holds the API.
"""

from atlas_jax.data.synthetic.registry import (
    CELL_SCENE_TASKS,
    DEFAULT_IMAGE_SIZE,
    TASKS,
    TaskSpec,
    generate,
    generate_split,
    generate_with_scene,
    task_names,
)
from atlas_jax.data.synthetic.source import SyntheticSource

__all__ = ["CELL_SCENE_TASKS", "DEFAULT_IMAGE_SIZE", "TASKS", "SyntheticSource", "TaskSpec", "generate", "generate_split", "generate_with_scene",
           "task_names"]

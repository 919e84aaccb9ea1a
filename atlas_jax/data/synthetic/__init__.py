"""The built-in synthetic ATLAS task suite: procedural images, trajectories with functional tokens,
and exact answers, deterministic by seed (same arguments -> byte-identical images and text).

    family        tokens                  held-out layout (validation / test vs train)
    shape_count   <|Shape|>               target count in the region: {5} / {6} vs {1..4};
                                          target colour cyan / pink / brown, never drawn in train
    arrow_chain   <|Arrow|>               chain length: {4} / {5} vs {1, 2, 3}
    line_side     <|Line|>                angle of AB: 45-60 / 70-88 deg vs 0-35 deg
    label_sum     <|Text|>                labels added: {4} / {5} vs {2, 3};
                                          colour added cyan / pink / brown, never drawn in train
    zoom_read     <|Manip|>               frame in the bottom-right quadrant (test: 2x clutter) vs elsewhere
    zoom_count    <|Manip|> <|Shape|>     dots in the frame: {4} / {5} vs {1, 2, 3};
                                          target dot colour cyan / pink, never drawn in train
    arrow_label   <|Arrow|> <|Text|>      chain length: {3} / {4} vs {1, 2}
    line_count    <|Line|> <|Shape|>      dots above the line: {4} / {5} vs {1, 2, 3}

    sample = generate("arrow_chain", "train", index=17, seed=0)          # one Sample
    for s in generate_split("validation", num_per_task=100): ...         # all tasks, interleaved
    sample, scene = generate_with_scene("shape_count", "test", 3)        # + what was drawn

Each family is one module (`Difficulty` dataclass + `build`); `registry.py` holds the API.
"""

from atlas_jax.data.synthetic.registry import (
    DEFAULT_IMAGE_SIZE,
    TASKS,
    TaskSpec,
    generate,
    generate_split,
    generate_with_scene,
    task_names,
)

__all__ = ["DEFAULT_IMAGE_SIZE", "TASKS", "TaskSpec", "generate", "generate_split", "generate_with_scene", "task_names"]

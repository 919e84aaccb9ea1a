"""The built-in synthetic ATLAS task suite: procedural images, trajectories with functional tokens,
and exact answers, deterministic by seed. See `registry.py` for the API and each family's module
docstring for what its held-out splits change."""

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

"""The whole ATLAS recipe on the built-in synthetic suite: SFT, then LA-GRPO (training data
generated on the fly), then evaluation of both checkpoints on the in_distribution, shifted and
hard conditions (512 prompts per family in-distribution, 128 in the others), with the image-swap
control and the majority / uniform baselines (WORKDIR/results.json, results.md). Tiny model, CPU,
2 cores. The README's main command:

    python -m atlas_jax.main --config=configs/atlas_synthetic.py --workdir=/tmp/atlas

arg: 'module' (visual-op modules, default) or 'vocab' (the paper exactly).
"""

import ml_collections

from atlas_jax import pretrained, run_config
from atlas_jax.data import synthetic


def get_config(arg: str = "module"):
    if arg not in ("module", "vocab"):
        raise ValueError(f"configs/atlas_synthetic.py:{arg}: expected 'module' or 'vocab'")
    c = run_config.synthetic_suite(run_config.base())
    c.job = "pipeline"
    # The starting point that can see, loaded as a user loads Qwen2.5-VL-7B (configs/perceive_synthetic.py).
    c.model.init_from_hf = pretrained.PERCEIVE_TINY
    c.optim.vision_lr_scale = 0.1  # its tower was pretrained at this rate; the suite's lr would make it drift
    c.model.visual_ops.mode = arg
    # Families that compose what the start sees (`data/synthetic/cell_scene.py`); the eight harder ones
    # ask for counting and glyph reading it cannot do at this size (bench/RESULTS.md, issue 12).
    c.data.tasks = synthetic.CELL_SCENE_TASKS
    c.train.log_every = 25
    c.rl.loss.alpha = 0.1
    # The anchor term's share of the gradient is a diagnostic (bench/compare_atlas.py reports it): its
    # second backward pass took a third of each update here (bench/RESULTS.md, "The main job's run time").
    c.rl.anchor_share = False
    c.eval.num_per_task = 128  # per family and condition: a 95% interval of about +-0.09 at p = 0.5 per family
    # The headline split: RL - SFT paired over 2048 prompts has an interval of about +-0.02; over 512
    # (+-0.035) it was as wide as RL's gain, and those prompts favoured RL by chance (bench/RESULTS.md,
    # "RL on 2048 prompts"). The other conditions stay at 128: 2 x 2048 decodes take ~70 s per checkpoint.
    c.eval.num_per_task_by_condition = ml_collections.ConfigDict({"in_distribution": 512})
    # The image-swap control has to show the fall toward the prior (~0.25 here), not resolve small
    # differences: 128 prompts per family, which saves 2 x 1536 decodes of the headline split.
    c.eval.image_swap_num_per_task = 128
    c.eval.batch_size = 128  # wider batches decode more prompts per second on CPU (2048 with swap: 70 s at 128, 93 s at 512)
    # What differs between the stages (each stage's config = this one + its section here).
    c.stages = ml_collections.ConfigDict()
    # Every third SFT record a perception question: keeps the start's reading of the image (without
    # it, SFT erases it within 100 steps); 1000 steps (bench/RESULTS.md, "Families the start can answer").
    c.stages.sft = ml_collections.ConfigDict({"data": {"perception_every": 3}, "train": {"steps": 1000}})
    c.stages.la_grpo = run_config.synthetic_rl_stage(ml_collections.ConfigDict({"train": {}, "optim": {}}))
    c.stages.la_grpo.eval = ml_collections.ConfigDict({"every": 0})  # the recipe evaluates after RL
    return c


def sweep():
    for mode in ("module", "vocab"):
        for alpha in (0.0, 0.1):
            yield {"model.visual_ops.mode": mode, "rl.loss.alpha": alpha}

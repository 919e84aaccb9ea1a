"""The whole ATLAS recipe on the built-in synthetic suite: SFT, then LA-GRPO, then evaluation
(tiny model, CPU, a few minutes on 2 cores). The README's main command:

    python -m atlas_jax.main --config=configs/atlas_synthetic.py --workdir=/tmp/atlas

arg: 'module' (visual-op modules, default) or 'vocab' (the paper exactly).
"""

import ml_collections

from atlas_jax import run_config


def get_config(arg: str = "module"):
    if arg not in ("module", "vocab"):
        raise ValueError(f"configs/atlas_synthetic.py:{arg}: expected 'module' or 'vocab'")
    c = run_config.synthetic_suite(run_config.base())
    c.job = "pipeline"
    c.model.visual_ops.mode = arg
    c.train.log_every = 25
    c.rl.loss.alpha = 0.1
    c.eval.num_per_task = 16
    # What differs between the stages (each stage's config = this one + its section here).
    c.stages = ml_collections.ConfigDict()
    c.stages.sft = ml_collections.ConfigDict()
    c.stages.la_grpo = run_config.synthetic_rl_stage(ml_collections.ConfigDict({"train": {}, "optim": {}}))
    c.stages.la_grpo.eval = ml_collections.ConfigDict({"every": 10})
    return c


def sweep():
    for mode in ("module", "vocab"):
        for alpha in (0.0, 0.1):
            yield {"model.visual_ops.mode": mode, "rl.loss.alpha": alpha}

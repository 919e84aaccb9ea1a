"""The whole ATLAS recipe on the built-in synthetic suite: SFT, then LA-GRPO, then evaluation
(tiny model, CPU, about 10 minutes on 2 cores). The README's main command:

    python -m atlas_jax.main --config=configs/atlas_synthetic.py --workdir=/tmp/atlas

arg: 'module' (visual-op modules, default) or 'vocab' (the paper exactly).
"""

from atlas_jax import run_config


def get_config(arg: str = "module"):
    if arg not in ("module", "vocab"):
        raise ValueError(f"configs/atlas_synthetic.py:{arg}: expected 'module' or 'vocab'")
    c = run_config.base()
    c.job = "pipeline"
    c.model.visual_ops.mode = arg
    c.data.synthetic_config = "small"
    c.data.num_per_task = 64
    c.data.image_size = 112
    c.data.batch_size = 16
    c.data.max_length = 192
    c.data.max_patches = 64
    c.train.steps = 300
    c.train.log_every = 25
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 20
    c.checkpoint.every = 100
    c.rl.steps = 20
    c.rl.prompts_per_step = 8
    c.rl.group_size = 4
    c.rl.max_new_tokens = 80
    c.rl.lr = 5e-5
    c.rl.alpha = 0.1
    c.rl.eval_every = 10
    c.eval.num_per_task = 16
    return c


def sweep():
    for mode in ("module", "vocab"):
        for alpha in (0.0, 0.1):
            yield {"model.visual_ops.mode": mode, "rl.alpha": alpha}

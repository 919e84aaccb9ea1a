"""The whole ATLAS recipe on the built-in synthetic suite: SFT, then LA-GRPO, then evaluation
(tiny model, CPU, a few minutes on 2 cores). The README's main command:

    python -m atlas_jax.main --config=configs/atlas_synthetic.py --workdir=/tmp/atlas

arg: 'module' (visual-op modules, default) or 'vocab' (the paper exactly).
"""

from atlas_jax import run_config


def get_config(arg: str = "module"):
    if arg not in ("module", "vocab"):
        raise ValueError(f"configs/atlas_synthetic.py:{arg}: expected 'module' or 'vocab'")
    c = run_config.synthetic_suite(run_config.base())
    c.job = "pipeline"
    c.model.visual_ops.mode = arg
    c.train.log_every = 25
    c.rl.alpha = 0.1
    c.rl.eval_every = 10
    c.eval.num_per_task = 16
    return c


def sweep():
    for mode in ("module", "vocab"):
        for alpha in (0.0, 0.1):
            yield {"model.visual_ops.mode": mode, "rl.alpha": alpha}

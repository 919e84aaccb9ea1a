"""LA-GRPO of the tiny synthetic-suite model, starting from an SFT run (CPU, minutes).

    python -m atlas_jax.main --config=configs/sft_synthetic.py --workdir=/tmp/atlas_sft
    python -m atlas_jax.main --config=configs/la_grpo_synthetic.py --workdir=/tmp/atlas_rl \\
        --config.checkpoint.init_from=/tmp/atlas_sft

arg: 'la_grpo' (alpha = 0.1, default) or 'grpo' (alpha = 0: plain GRPO), optionally followed by
',vocab' for a model without visual-op modules (e.g. 'grpo,vocab'); it must match the SFT run.
"""

from atlas_jax import run_config


def get_config(arg: str = "la_grpo"):
    c = run_config.synthetic_rl_stage(run_config.synthetic_suite(run_config.base()))
    c.job = "la_grpo"
    algo, *rest = arg.split(",")
    if algo not in ("la_grpo", "grpo") or rest not in ([], ["vocab"], ["module"]):
        raise ValueError(f"configs/la_grpo_synthetic.py:{arg}: expected 'la_grpo' or 'grpo', optionally ',vocab'")
    c.model.visual_ops.mode = rest[0] if rest else "module"
    c.rl.loss.alpha = 0.1 if algo == "la_grpo" else 0.0
    c.checkpoint.every = 10
    c.train.log_every = 1
    return c


def sweep():
    """GRPO against LA-GRPO at a few anchor weights."""
    for alpha in (0.0, 0.05, 0.1, 0.3):
        yield {"rl.loss.alpha": alpha}

"""SFT of a tiny from-scratch model on the built-in synthetic ATLAS suite (CPU, minutes).

    python -m atlas_jax.main --config=configs/sft_synthetic.py --workdir=/tmp/atlas_sft
    python -m atlas_jax.main --config=configs/sft_synthetic.py:vocab --workdir=/tmp/atlas_sft_vocab
    python -m atlas_jax.main --config=configs/sft_synthetic.py:answer_only --workdir=/tmp/atlas_sft_answer

arg: 'module' (functional tokens + visual-op modules, default), 'vocab' (functional tokens as plain
vocabulary rows: the paper exactly), 'answer_only' (baseline: trained on "\\boxed{answer}" only).
"""

from atlas_jax import run_config


def get_config(arg: str = "module"):
    c = run_config.synthetic_suite(run_config.base())
    c.job = "sft"
    variants = ("module", "vocab", "answer_only")
    if arg not in variants:
        raise ValueError(f"configs/sft_synthetic.py:{arg}: expected one of {variants}")
    c.model.visual_ops.mode = "vocab" if arg == "vocab" else "module"
    c.data.sft_target = "answer_only" if arg == "answer_only" else "trajectory"
    return c


def sweep():
    """Learning rate x visual-op mode; each point is a set of overrides."""
    for lr in (1e-3, 3e-3):
        for mode in ("module", "vocab"):
            yield {"optim.lr": lr, "model.visual_ops.mode": mode}

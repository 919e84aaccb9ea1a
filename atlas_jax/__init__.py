"""atlas-jax: vision-language models that reason with functional tokens (ATLAS, LA-GRPO), in JAX + Flax NNX.

Entry point: `python -m atlas_jax.main --config=configs/....py --workdir=DIR` (see README.md).
"""

__version__ = "0.1.0"

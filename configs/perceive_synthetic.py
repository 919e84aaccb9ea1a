"""Dense perception pretraining of the tiny model: the starting point that can see (CPU, minutes).

    python -m atlas_jax.main --config=configs/perceive_synthetic.py --workdir=/tmp/perceive

Writes a Qwen2.5-VL-format checkpoint to /tmp/perceive/hf (config.json, model.safetensors,
tokenizer files) and its held-out check to /tmp/perceive/perception.json; the main job starts
from it like from Qwen2.5-VL-7B: `--config.model.init_from_hf=/tmp/perceive/hf`. The package
ships the result of this command (atlas_jax/pretrained/perceive_tiny, see its MANIFEST.json).
"""

from atlas_jax import run_config


def get_config(arg: str = ""):
    del arg
    c = run_config.synthetic_suite(run_config.base())
    c.job = "perceive"
    c.data.source = "perception"
    c.data.max_length = 160
    # A plain VLM, no functional tokens: `init_from_hf` adds them as it does to a released checkpoint.
    c.model.functional_tokens = ()
    c.model.visual_ops.mode = "vocab"
    # Measured (bench/RESULTS.md, "A tiny pretrained VLM that can see"): at the suite's lr the
    # from-scratch tower's output drifts to a large image-independent vector within 50 steps (norm
    # 0.65 -> 18, spread across images 20% -> 1%); weight decay or a lower global lr do not stop it,
    # a 10x lower learning rate for the tower does (norm ~2, spread ~5%).
    c.optim.vision_lr_scale = 0.1
    # Measured (bench/RESULTS.md, "Families the start can answer"): held-out exact answers 0.45 after
    # 1500 steps, 0.65 after 4000, and the main job's families read only from a start past ~4000.
    c.train.steps = 8000
    c.train.log_every = 250
    c.checkpoint.every = 1000
    c.checkpoint.keep = 2
    c.eval.num_per_task = 256  # held-out perception prompts checked after training (a multiple of eval.batch_size)
    return c

"""LA-GRPO of an SFT'd Qwen2.5-VL-7B on a TPU pod slice, starting from `sft_qwen25vl_7b.py`'s run.

Sized for v5p-64 (32 chips, topology v5p:2x4x4; the default) or, with the argument `v5e`, for
v5e-64 (64 chips, v5e:8x8): 64 prompts x 8 rollouts per update either way, the update summed
over micro-batches of `rl.micro_batch` rollouts. Check a slice before renting it:

    python -m atlas_jax.compile_check --config=configs/la_grpo_qwen25vl_7b.py:v5e --topology=v5e:8x8

    launch/tpu_run.sh --tpu=NAME --zone=ZONE --project=PROJECT -- \\
        --config=configs/la_grpo_qwen25vl_7b.py --workdir=gs://BUCKET/atlas/la_grpo_7b \\
        --config.model.init_from_hf=/mnt/ckpt/Qwen2.5-VL-7B-Instruct \\
        --config.checkpoint.init_from=gs://BUCKET/atlas/sft_7b \\
        --config.data.source=jsonl --config.data.jsonl_train=/mnt/data/rl_prompts.jsonl

arg: comma-separated options: 'la_grpo' (alpha = 0.1, default) or 'grpo' (alpha = 0); 'v5p'
(default) or 'v5e'.
"""

from atlas_jax import run_config


# micro_batch: rollouts per forward / backward pass of the update (per chip: micro_batch / chips).
# anchor_share: the anchor term's share of the gradient, a diagnostic that costs a second backward
# pass (on v5e-64: 14.99 of 16 GiB with it, 8.46 without). Figures: bench/RESULTS.md, "7B on pod slices".
SLICES = {
    "v5p": dict(micro_batch=64, anchor_share=True),  # 32 chips x 95 GiB: 2 rollouts per chip per pass, 8 passes
    "v5e": dict(micro_batch=64, anchor_share=False),  # 64 chips x 16 GiB: 1 rollout per chip per pass, 8 passes
}


def get_config(arg: str = "la_grpo"):
    options = set(arg.split(","))
    methods, slices = options & {"la_grpo", "grpo"}, options & set(SLICES)
    if options - methods - slices or len(methods) > 1 or len(slices) > 1:
        raise ValueError(f"configs/la_grpo_qwen25vl_7b.py:{arg}: expected 'la_grpo' or 'grpo' and/or one of {sorted(SLICES)}")
    method, pod = (methods or {"la_grpo"}).pop(), (slices or {"v5p"}).pop()
    c = run_config.base()
    c.job = "la_grpo"
    c.distributed = True
    c.mesh = (1, -1, 1)
    c.model.preset = "qwen25vl_7b"  # the architecture the compile check sizes (the checkpoint's config.json wins)
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.remat = "full"
    c.model.scan_layers = True  # one compiled layer body per run of layers
    c.model.visual_ops.layer = 14
    c.model.visual_ops.num_heads = 16
    c.model.visual_ops.head_dim = 128
    c.model.visual_ops.max_positions = 16
    c.data.source = "jsonl"
    c.data.max_length = 2048  # prompt (with image tokens)
    c.data.max_patches = 4096
    c.data.max_images = 4
    c.data.pad_to_multiple = 0
    c.optim.freeze_vision = True
    c.train.steps = 400  # rollout batches
    c.rl.prompts_per_step = 64
    c.rl.group_size = 8
    # 512 rollouts of <= 3072 tokens per update, summed exactly inside the one update step.
    c.rl.micro_batch = SLICES[pod]["micro_batch"]
    c.rl.anchor_share = SLICES[pod]["anchor_share"]
    c.rl.num_iterations = 2
    c.rl.sample.max_new_tokens = 1024
    c.rl.sample.temperature = 1.0
    c.optim.lr = 1e-6
    c.optim.warmup_steps = 2
    c.rl.loss.beta = 0.04
    c.rl.loss.alpha = 0.1 if method == "la_grpo" else 0.0
    c.rl.loss.loss_type = "dapo"
    c.eval.every = 50
    c.checkpoint.every = 50
    c.eval.num_per_task = 50
    c.eval.batch_size = 64
    c.eval.max_new_tokens = 1024
    return c


def sweep():
    """Plain GRPO against LA-GRPO at increasing anchor weights."""
    for alpha in (0.0, 0.05, 0.1, 0.2):
        yield {"rl.loss.alpha": alpha}

"""SFT of Qwen2.5-VL-7B-Instruct with functional tokens on a TPU pod slice.

Sized for v5p-64 (32 chips, topology v5p:2x4x4; the default) or, with the argument `v5e`, for
v5e-64 (64 chips, v5e:8x8): the global batch is 128 sequences of 4096 tokens either way; the
per-chip batch and `optim.grad_accum` differ. Check a slice before renting it:

    python -m atlas_jax.compile_check --config=configs/sft_qwen25vl_7b.py:v5e --topology=v5e:8x8

The weights load straight into an fsdp-sharded model from a local (or gcsfuse-mounted) Hugging
Face checkpoint directory; every host runs the same command:

    launch/tpu_run.sh --tpu=NAME --zone=ZONE --project=PROJECT -- \\
        --config=configs/sft_qwen25vl_7b.py --workdir=gs://BUCKET/atlas/sft_7b \\
        --config.model.init_from_hf=/mnt/ckpt/Qwen2.5-VL-7B-Instruct \\
        --config.data.source=jsonl --config.data.jsonl_train=/mnt/data/atlas178k/train.jsonl

arg: comma-separated options: 'module' (default) or 'vocab'; 'v5p' (default) or 'v5e'.
"""

from atlas_jax import run_config


# Per slice: sequences per optimizer step and the passes they are split into (per-chip rows per
# pass = batch_size / grad_accum / chips). Figures: bench/RESULTS.md, "7B on pod slices".
SLICES = {
    "v5p": dict(batch_size=128, grad_accum=1),  # 32 chips x 95 GiB: 4 sequences per chip at once
    "v5e": dict(batch_size=128, grad_accum=2),  # 64 chips x 16 GiB: 1 sequence per chip per pass
}


def get_config(arg: str = "module"):
    options = set(arg.split(","))
    modes, slices = options & {"module", "vocab"}, options & set(SLICES)
    if options - modes - slices or len(modes) > 1 or len(slices) > 1:
        raise ValueError(f"configs/sft_qwen25vl_7b.py:{arg}: expected 'module' or 'vocab' and/or one of {sorted(SLICES)}")
    mode, pod = (modes or {"module"}).pop(), (slices or {"v5p"}).pop()
    c = run_config.base()
    c.job = "sft"
    c.distributed = True
    c.mesh = (1, -1, 1)  # pure FSDP over every chip: 7B params + Adam fit in 16 GiB x 64 chips with room for activations
    c.model.init_from_hf = ""  # required: a Qwen2.5-VL checkpoint directory
    c.model.preset = "qwen25vl_7b"  # the architecture the compile check sizes (the checkpoint's config.json wins)
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.remat = "full"
    c.model.scan_layers = True  # one compiled layer body per run of layers
    c.model.visual_ops.mode = mode
    c.model.visual_ops.layer = 14  # mid-depth of 28 decoder layers
    c.model.visual_ops.num_heads = 16
    c.model.visual_ops.head_dim = 128
    c.model.visual_ops.max_positions = 16
    c.data.source = "jsonl"
    c.data.batch_size = SLICES[pod]["batch_size"]
    c.optim.grad_accum = SLICES[pod]["grad_accum"]
    c.data.max_length = 4096
    c.data.max_patches = 4096  # up to 1024 merged image tokens per sample
    c.data.max_images = 4
    c.data.pad_to_multiple = 0  # fixed shapes across hosts
    c.data.worker_count = 8
    c.optim.lr = 1e-5
    c.optim.warmup_steps = 100
    c.optim.weight_decay = 0.01
    c.optim.freeze_vision = True
    c.train.steps = 3000
    c.train.log_every = 10
    c.checkpoint.every = 500
    c.checkpoint.keep = 3
    c.eval.num_per_task = 50
    c.eval.batch_size = 64
    c.eval.max_new_tokens = 1024
    return c


def sweep():
    for lr in (5e-6, 1e-5, 2e-5):
        yield {"optim.lr": lr}

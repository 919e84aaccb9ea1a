"""Forward+backward throughput of the JAX model against `transformers`' PyTorch Qwen2.5-VL.

Both frameworks run the same model on the same weights and the same batch, on CPU:

- a random `Qwen2_5_VLForConditionalGeneration` (float32) is built from an atlas preset and
  saved with `save_pretrained`; the JAX model is `hf_checkpoint.from_hf` of that directory,
  so every weight is identical;
- a batch of B sequences of T tokens, each holding one image of `--image` x `--image` pixels
  after 4 text tokens (`--image 0`: text only), no padding;
- the timed step is forward + backward of the mean next-token cross-entropy (all T - 1
  predictions of every sequence). JAX: one `jax.jit`ed `value_and_grad` of a pure function of
  the parameter state (`nnx.split` outside, `nnx.merge` inside), `block_until_ready` on loss
  and gradients. PyTorch: eager mode, `loss.backward()`, `--attn` attention (sdpa is the
  `transformers` default).

Each framework runs in its own worker process pinned to the same `--threads` cores (XLA sizes
its CPU thread pool from the affinity mask; torch gets `set_num_threads`), so neither sees the
other's thread pools or allocator. Before timing, the two losses must agree to 1e-4 and the
global gradient norms to 1e-3 (relative): both sides measure the same computation.

Timing takes turns: JAX runs `--turn` steps, then torch does, and so on, so that load from other
processes on a shared machine hits both alike. The first step of every turn is run but not
timed: it pays for the other process having just used the cores and memory (on the 2-core
development machine the first JAX step after a PyTorch turn took 7.0 s against 5.0 s for the
next ones at ~100M), a cost a training run, which never switches, does not see. `--turn 2` is
the old strict alternation with that step dropped. Warm-up steps (compilation, allocator
growth) are excluded; medians are reported, and the untimed first steps are printed too.

`--malloc thp` (the default) starts both workers with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`:
glibc then backs large allocations with transparent huge pages. XLA:CPU allocates a step's
buffers afresh each step, so with 4 KiB pages every step faults its working set in again;
PyTorch gains too, less. `--malloc default` leaves the allocator as it is. Both are in
bench/RESULTS.md.

Run from the repository root:

    python bench/bench_train_step.py --config tiny
    python bench/bench_train_step.py --config 100m
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import tempfile
import time

import numpy as np

LOSS_TOL = 1e-4
GRAD_NORM_RTOL = 1e-3
# Defaults per config: (batch, seq, steps, warmup, turn); each full run stays within ~5 minutes on 2 cores.
DEFAULTS = {"tiny": (8, 256, 20, 3, 6), "100m": (8, 256, 4, 1, 3)}
HUGE_PAGES = "glibc.malloc.hugetlb=1"


def model_config(name: str):
    """The atlas preset, with the special image tokens at the top of its vocabulary."""
    from atlas_jax.model import presets

    make = {"tiny": presets.tiny, "100m": presets.small_100m}[name]
    vocab = make().text.vocab_size
    return make(
        image_token_id=vocab - 4, video_token_id=vocab - 3, vision_start_token_id=vocab - 2, vision_end_token_id=vocab - 1
    )


# ---------------------------------------------------------------------------- batch
def make_batch(cfg, B: int, T: int, image: int, seed: int = 0) -> dict[str, np.ndarray]:
    """B samples of T tokens: 4 text tokens, one image (vision start, image tokens, vision end), text.

    Returns numpy arrays (`device_batch` layout): input_ids int32[B, T], positions
    int32[B, 3, T] (M-RoPE), attention_mask bool[B, T], targets int32[B, T] (the next token),
    weights float32[B, T] (0 at the last position), and with an image pixel_values
    float32[B, P, C], grid int[B, 3] and the layout tables.
    """
    from atlas_jax.model.rope import mrope_positions
    from atlas_jax.model.vision_layout import batch_vision_layout

    rng = np.random.default_rng(seed)
    text_vocab = cfg.image_token_id  # ordinary tokens lie below the special ones
    v = cfg.vision
    out: dict = {}
    if image:
        if image % (v.patch_size * v.spatial_merge_size):
            raise SystemExit(f"--image {image}: expected a multiple of {v.patch_size * v.spatial_merge_size} pixels")
        g = image // v.patch_size
        n_img = g * g // v.merge_unit
        if 4 + n_img + 2 >= T:
            raise SystemExit(f"--image {image} needs {n_img + 2} tokens; --seq {T} leaves no room for text")
        head = [cfg.vision_start_token_id] + [cfg.image_token_id] * n_img + [cfg.vision_end_token_id]
        rows = [np.concatenate([rng.integers(0, text_vocab, 4), head, rng.integers(0, text_vocab, T - 4 - len(head))]) for _ in range(B)]
        ids = np.stack(rows).astype(np.int32)
        out["grid"] = np.tile([1, g, g], (B, 1))
        out["pixel_values"] = rng.standard_normal((B, g * g, v.patch_dim)).astype(np.float32)
    else:
        ids = rng.integers(0, text_vocab, (B, T)).astype(np.int32)
    grids = [[tuple(out["grid"][b])] if image else [] for b in range(B)]
    out["input_ids"] = ids
    out["positions"] = np.stack(
        [mrope_positions(ids[b], grids[b], image_token_id=cfg.image_token_id, spatial_merge_size=v.spatial_merge_size) for b in range(B)]
    )
    out["attention_mask"] = np.ones((B, T), bool)
    # Next-token targets over all T positions with the last one weighted 0, rather than slicing
    # logits[:, :-1]: the slice would copy the [B, T, V] logits (and pad them back in backward).
    out["targets"] = np.roll(ids, -1, axis=1)
    out["weights"] = np.ones((B, T), np.float32)
    out["weights"][:, -1] = 0.0
    if image:
        out.update(batch_vision_layout(grids, v, out["pixel_values"].shape[1]))
    return out


# ---------------------------------------------------------------------------- steps
def jax_step_fn(ckpt_dir: str, batch: dict):
    """(step, n_params): `step()` runs one jitted forward+backward, returns (loss, grad norm)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from atlas_jax import hf_checkpoint, sharding
    from atlas_jax.data.device_batch import model_inputs

    model = hf_checkpoint.from_hf(ckpt_dir, mesh=sharding.make_mesh((1, 1, 1), jax.devices()[:1]))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))

    @jax.jit
    def loss_and_grad(params, rest, inputs):
        def loss_fn(params):
            model = nnx.merge(graphdef, params, rest)
            args, kw = model_inputs(inputs)
            logits, _, _ = model(*args, **kw)
            picked = jnp.take_along_axis(logits, inputs["targets"][..., None], axis=-1)[..., 0]
            nll = jax.nn.logsumexp(logits, axis=-1) - picked
            return jnp.sum(nll * inputs["weights"]) / jnp.sum(inputs["weights"])

        return jax.value_and_grad(loss_fn)(params)

    inputs = {k: jnp.asarray(x) for k, x in batch.items()}

    def step(check: bool = False):
        loss, grads = jax.block_until_ready(loss_and_grad(params, rest, inputs))
        if not check:
            return None
        norm = np.sqrt(sum(np.sum(np.square(np.asarray(g, np.float64))) for g in jax.tree.leaves(grads)))
        return float(loss), float(norm)

    return step, n_params


def torch_step_fn(ckpt_dir: str, batch: dict, attn: str):
    """(step, n_params): `step()` runs one eager forward+backward, returns (loss, grad norm)."""
    import torch
    import torch.nn.functional as F
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt_dir, dtype=torch.float32, attn_implementation=attn)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    ids = torch.from_numpy(batch["input_ids"]).long()
    targets = torch.from_numpy(batch["targets"]).long().reshape(-1)
    weights = torch.from_numpy(batch["weights"]).reshape(-1)
    kw = {}
    if "pixel_values" in batch:
        pv = batch["pixel_values"]
        kw = dict(
            pixel_values=torch.from_numpy(pv.reshape(-1, pv.shape[-1])),
            image_grid_thw=torch.from_numpy(batch["grid"]).long(),
            mm_token_type_ids=(ids == model.config.image_token_id).int(),
        )
    mask = torch.ones_like(ids)

    def step(check: bool = False):
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False, **kw).logits
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets, reduction="none")
        loss = (nll * weights).sum() / weights.sum()
        loss.backward()
        if not check:
            return None
        norm = np.sqrt(sum(float(torch.sum(p.grad.double() ** 2)) for p in params if p.grad is not None))
        return float(loss.detach()), float(norm)

    return step, sum(p.numel() for p in params)


def save_checkpoint(cfg, ckpt_dir: str, seed: int = 0) -> None:
    """A random float32 Qwen2.5-VL with `cfg`'s shapes, written by `save_pretrained`."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    # No bos/eos ids: the defaults (151643, 151645) lie outside the small vocabularies here.
    hf_cfg = Qwen2_5_VLConfig.from_dict({**cfg.to_hf_dict(), "bos_token_id": None, "eos_token_id": None})
    torch.manual_seed(seed)
    Qwen2_5_VLForConditionalGeneration(hf_cfg).float().save_pretrained(ckpt_dir)


# ---------------------------------------------------------------------------- workers
def worker(framework: str, args: argparse.Namespace, ckpt_dir: str, batch: dict, conn) -> None:
    """Builds one framework's step, then answers 'check' (loss, grad norm) and 'time' (seconds).

    Each worker imports only its own framework: torch in the JAX process (its OpenMP and MKL
    runtimes) slowed the 2-thread tiny JAX step from 0.135 s to 0.167 s on the development
    machine, without torch running a single op."""
    # Pin before the first JAX call: XLA's CPU client sizes its thread pool from the affinity mask.
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])
    if framework == "jax":
        step, n_params = jax_step_fn(ckpt_dir, batch)
    else:
        import torch

        torch.set_num_threads(args.threads)
        step, n_params = torch_step_fn(ckpt_dir, batch, args.attn)
    conn.send(n_params)
    while True:
        cmd = conn.recv()
        if cmd == "stop":
            return
        t0 = time.perf_counter()
        result = step(check=cmd == "check")
        conn.send(result if cmd == "check" else time.perf_counter() - t0)


def start(framework: str, args, ckpt_dir: str, batch: dict):
    parent, child = mp.Pipe()
    proc = mp.get_context("spawn").Process(target=worker, args=(framework, args, ckpt_dir, batch, child), daemon=True)
    proc.start()
    return proc, parent


def call(conn, cmd: str):
    conn.send(cmd)
    return conn.recv()


# ---------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", choices=sorted(DEFAULTS), default="tiny")
    ap.add_argument("--steps", type=int, help="timed steps per framework (default: per config)")
    ap.add_argument("--warmup", type=int, help="untimed steps per framework after the check step")
    ap.add_argument("--turn", type=int, help="steps per framework per turn, the first one untimed (>= 2)")
    ap.add_argument("--malloc", choices=("thp", "default"), default="thp",
                    help="thp: both workers back large allocations with huge pages (GLIBC_TUNABLES)")
    ap.add_argument("--batch", type=int, help="sequences per batch")
    ap.add_argument("--seq", type=int, help="tokens per sequence")
    ap.add_argument("--image", type=int, default=112, help="image side in pixels, one image per sample (0: text only)")
    ap.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa", help="transformers attention implementation")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                    help="cores for each framework (default: all); both get the same number")
    args = ap.parse_args()
    B, T, steps, warmup, turn = DEFAULTS[args.config]
    args.batch, args.seq = args.batch or B, args.seq or T
    args.steps = args.steps or steps
    args.warmup = warmup if args.warmup is None else args.warmup
    args.turn = args.turn or turn
    if args.turn < 2:
        raise SystemExit(f"--turn {args.turn}: expected at least 2 (the first step of a turn is not timed)")
    if args.malloc == "thp":
        # Read by the dynamic loader when a worker starts, so it must be set before they spawn.
        tunables = [t for t in os.environ.get("GLIBC_TUNABLES", "").split(":") if t]
        os.environ["GLIBC_TUNABLES"] = ":".join([*tunables, HUGE_PAGES])

    cfg = model_config(args.config)
    with tempfile.TemporaryDirectory(prefix="bench_ckpt_") as ckpt_dir:
        # ---- identical weights: torch random init -> safetensors -> both workers load it
        save_checkpoint(cfg, ckpt_dir)
        batch = make_batch(cfg, args.batch, args.seq, args.image)  # numpy, sent to both workers
        workers = {name: start(name, args, ckpt_dir, batch) for name in ("jax", "torch")}
        conns = {name: conn for name, (_, conn) in workers.items()}
        n_params = {name: conn.recv() for name, conn in conns.items()}
    if n_params["jax"] != n_params["torch"]:
        raise SystemExit(f"parameter counts differ: {n_params}")
    n_img = (args.image // cfg.vision.patch_size) ** 2 // cfg.vision.merge_unit
    images = f"one {args.image}px image ({n_img} image tokens) per sample" if args.image else "text only"
    import jax
    import torch

    print(f"config={args.config} params={n_params['jax']:,} ({n_params['jax'] / 1e6:.1f}M) "
          f"batch={args.batch}x{args.seq} tokens, {images}; "
          f"torch attn={args.attn}; threads={args.threads} each; jax {jax.__version__}, torch {torch.__version__}")

    # ---- same computation? (the first JAX step also compiles)
    t0 = time.perf_counter()
    jl, jn = call(conns["jax"], "check")
    compile_s = time.perf_counter() - t0
    tl, tn = call(conns["torch"], "check")
    print(f"loss jax={jl:.6f} torch={tl:.6f} |diff|={abs(jl - tl):.1e}; grad norm jax={jn:.6f} torch={tn:.6f} "
          f"rel diff={abs(jn - tn) / tn:.1e}; first JAX step incl. compile {compile_s:.1f}s")
    if abs(jl - tl) > LOSS_TOL:
        raise SystemExit(f"losses differ by {abs(jl - tl):.2e} > {LOSS_TOL}: the two sides do not compute the same thing")
    if abs(jn - tn) > GRAD_NORM_RTOL * tn:
        raise SystemExit(f"gradient norms differ by {abs(jn - tn) / tn:.2e} (relative) > {GRAD_NORM_RTOL}")

    # ---- timing in turns; the first step of each turn is run untimed
    for _ in range(args.warmup):
        for conn in conns.values():
            call(conn, "time")
    times = {"jax": [], "torch": []}
    first = {"jax": [], "torch": []}
    while min(len(v) for v in times.values()) < args.steps:
        for name, conn in conns.items():
            first[name].append(call(conn, "time"))
            for _ in range(min(args.turn - 1, args.steps - len(times[name]))):
                times[name].append(call(conn, "time"))
    for name, (proc, conn) in workers.items():
        conn.send("stop")
        proc.join()

    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = args.batch * args.seq
    print(f"\n{'':8}{'median s/step':>14}{'min':>9}{'max':>9}{'tokens/s':>11}")
    for name in ("jax", "torch"):
        v = times[name]
        print(f"{name:8}{med[name]:>14.4f}{min(v):>9.4f}{max(v):>9.4f}{tokens / med[name]:>11.0f}")
    print(f"ratio JAX/PyTorch tokens/s: {med['torch'] / med['jax']:.2f}x "
          f"({args.steps} timed steps each in turns of {args.turn}, {args.warmup} warm-up, malloc={args.malloc})")
    print("untimed first step of each turn, median s: "
          + ", ".join(f"{name} {statistics.median(v):.4f}" for name, v in first.items()))


if __name__ == "__main__":
    main()

"""Does the tiny model see? The image path's scale drift, and the perception-pretrained checkpoint.

`--mode drift`: trains the tiny model from scratch on the perception stream (the SFT step of
`configs/perceive_synthetic.py` with the given optimizer settings) and prints, every `--every`
steps, on 64 held-out prompts: loss with own / swapped images (each prompt gets the next prompt's
image), the vision output's mean per-token norm, and its spread across images (mean distance of a
token from the same token averaged over the batch, relative to the norm).

`--mode check`: the held-out check of a Qwen2.5-VL-format checkpoint (`jobs/perceive.check`:
exact answers with own images, with swapped images, and the image-blind prior, 95% Wilson
intervals) on `--num` prompts of each seed, and a linear probe (ridge classifier) on its image
tokens against the same tower at initialisation: per occupied 3 x 3 cell, the colour of its object.
Run from the repository root:

    python bench/bench_perception.py --mode drift --vision-lr-scale 1 --steps 100
    python bench/bench_perception.py --mode check --hf atlas_jax/pretrained/perceive_tiny --seeds 1,2,3
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import tempfile

import numpy as np


def _config(**over):
    from atlas_jax import run_config

    spec = importlib.util.spec_from_file_location("perceive", os.path.join(os.path.dirname(__file__), "..", "configs", "perceive_synthetic.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return run_config.apply_overrides(mod.get_config(), over)


def _batch(samples, tok, c, model_cfg, mesh):
    import jax

    from atlas_jax import builders
    from atlas_jax.data import pipeline
    from atlas_jax.tokenizer import RunTokens

    pcfg = builders.make_pipeline_config(c, model_cfg, fmt="sft", batch_size=len(samples), shuffle=False, num_epochs=1)
    host = next(iter(pipeline.make_dataset(samples, tok, RunTokens.of(tok), pcfg, model_cfg)))
    return {k: v for k, v in pipeline.to_global(host, mesh).items() if isinstance(v, jax.Array)}


def drift(args) -> None:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from atlas_jax import builders, tokenizer as tokenizer_lib
    from atlas_jax.data import pipeline
    from atlas_jax.data.device_batch import model_inputs
    from atlas_jax.data.synthetic import perception
    from atlas_jax.jobs import perceive
    from atlas_jax.train import optimizer, sft, train_state

    c = _config(**{"optim.vision_lr_scale": args.vision_lr_scale, "optim.weight_decay": args.weight_decay,
                   "optim.lr": args.lr, "train.steps": args.steps, "seed": args.seed})
    workdir = tempfile.mkdtemp(prefix="perception_drift_")
    mesh = builders.make_mesh(c)
    tok = builders.make_tokenizer(c, workdir)
    tokens = tokenizer_lib.RunTokens.of(tok, c.model.functional_tokens)
    model = builders.make_model(c, tok, tokens, mesh)
    tx, _ = optimizer.from_config(nnx.state(model), c.optim, total_steps=c.train.steps)
    graphdef, state, state_sh = train_state.create(model, tx, mesh)
    held = [perception.generate("held_out", i, c.seed) for i in range(64)]
    own = _batch(held, tok, c, model.cfg, mesh)
    swapped = _batch(perceive.image_swapped(held, 64), tok, c, model.cfg, mesh)

    @jax.jit
    def measure(params, batch):
        m = nnx.merge(graphdef, params)
        args_, kw = model_inputs(batch)
        hidden, _, _ = m(*args_, head=False, **kw)
        ce, sums = sft.sft_loss(hidden, m.output_head(), batch)
        f_bud = m.image_features(batch["pixel_values"], kw["vision"])
        norm = jnp.linalg.norm(f_bud, axis=-1).mean()
        spread = jnp.linalg.norm(f_bud - f_bud.mean(0, keepdims=True), axis=-1).mean() / norm
        return ce / sums["tokens"], norm, spread

    data_it = iter(pipeline.make_dataset(builders.load_split(c, workdir, "train"), tok, tokens,
                                         builders.make_pipeline_config(c, model.cfg, fmt="sft"), model.cfg))
    step_fn = None
    for step in range(args.steps + 1):
        if step % args.every == 0:
            loss, norm, spread = (float(x) for x in measure(state.params, own))
            swap_loss = float(measure(state.params, swapped)[0])
            print(json.dumps({"step": step, "loss": round(loss, 4), "swap_loss": round(swap_loss, 4),
                              "feature_norm": round(norm, 3), "spread": round(spread, 4)}), flush=True)
        if step == args.steps:
            break
        batch = {k: v for k, v in pipeline.to_global(next(data_it), mesh).items() if isinstance(v, jax.Array)}
        if step_fn is None:
            step_fn = sft.make_train_step(graphdef, tx, state_sharding=state_sh, batch_sharding={k: v.sharding for k, v in batch.items()})
        with jax.set_mesh(mesh):
            state, _ = step_fn(state, batch)


def _ridge_accuracy(x_train, y_train, x_test, y_test, classes: int, lam: float = 1e-3) -> float:
    """Accuracy of a ridge-regression classifier (one-hot targets, standardised features)."""
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    a, b = (x_train - mu) / sd, (x_test - mu) / sd
    w = np.linalg.solve(a.T @ a + lam * len(a) * np.eye(a.shape[1]), a.T @ np.eye(classes)[y_train])
    return float(np.mean((b @ w).argmax(1) == y_test))


def check(args) -> None:
    import jax
    from flax import nnx

    from atlas_jax import builders, hf_checkpoint, sharding
    from atlas_jax import tokenizer as tokenizer_lib
    from atlas_jax.data.device_batch import model_inputs
    from atlas_jax.data.synthetic import perception
    from atlas_jax.jobs import perceive, results
    from atlas_jax.model import vlm

    mesh = sharding.make_mesh((-1, 1, 1))
    model = hf_checkpoint.from_hf(args.hf, mesh=mesh)
    tok = tokenizer_lib.load_tokenizer(args.hf)
    tokens = tokenizer_lib.RunTokens.of(tok, ())
    graphdef, params = nnx.split(model)
    policy = builders.Policy(tok, tokens, model.cfg, graphdef, params, args.hf)
    pooled = {"accuracy": [], "image_swap": [], "prior": []}
    for seed in args.seeds:
        c = _config(**{"seed": seed})
        held = [perception.generate("held_out", i, seed) for i in range(args.num)]
        r = perceive.check(policy, c, held, mesh)
        print(json.dumps({"seed": seed, **{k: r[k] for k in ("accuracy", "accuracy_interval", "image_swap", "image_swap_interval",
                                                             "prior", "prior_interval", "token_accuracy", "token_accuracy_image_swap")},
                          "accuracy_per_kind": r["accuracy_per_kind"], "image_swap_per_kind": r["image_swap_per_kind"],
                          "prior_per_kind": r["prior_per_kind"]}), flush=True)
        for k in pooled:
            pooled[k].append(r[k] * args.num)
    n = args.num * len(args.seeds)
    print(json.dumps({"pooled": {k: [sum(v) / n, results.wilson_interval(round(sum(v)), n)] for k, v in pooled.items()}, "prompts": n}))

    # Linear probe: per cell, its object's colour or 'empty', from the flattened image tokens.
    c = _config()
    scenes = {split: [perception.generate_with_scene(split, i, args.seeds[0]) for i in range(n_)]
              for split, n_ in (("train", 1024), ("held_out", 512))}
    labels = {s: np.array([[1 + perception.COLORS.index(o["color"]) if (o := {o["cell"]: o for o in sc["objects"]}.get(k)) else 0
                            for k in range(9)] for _, sc in v]) for s, v in scenes.items()}
    fresh = vlm.create(model.cfg, mesh, seed=args.seeds[0])
    for name, m in (("pretrained", model), ("initialisation", fresh)):
        feats = {}
        for s, v in scenes.items():
            rows = []
            for start in range(0, len(v), 64):
                b = _batch([x for x, _ in v[start:start + 64]], tok, c, model.cfg, mesh)
                _, kw = model_inputs(b)
                rows.append(np.asarray(jax.device_get(m.image_features(b["pixel_values"], kw["vision"]))).reshape(len(v[start:start + 64]), -1))
            feats[s] = np.concatenate(rows)
        # Occupied cells only (the colour of the object there, 9-way): an empty cell is the easy majority.
        acc, majority = [], []
        for k in range(9):
            tr, te = labels["train"][:, k] > 0, labels["held_out"][:, k] > 0
            acc.append(_ridge_accuracy(feats["train"][tr], labels["train"][tr, k], feats["held_out"][te], labels["held_out"][te, k], 10))
            majority.append(np.mean(labels["held_out"][te, k] == np.bincount(labels["train"][tr, k]).argmax()))
        print(json.dumps({"probe": name, "occupied_cell_colour_accuracy": round(float(np.mean(acc)), 4),
                          "majority": round(float(np.mean(majority)), 4)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=("drift", "check"), required=True)
    ap.add_argument("--vision-lr-scale", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hf", default="atlas_jax/pretrained/perceive_tiny")
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 3])
    ap.add_argument("--num", type=int, default=256, help="held-out prompts per seed (a multiple of 16)")
    args = ap.parse_args()
    drift(args) if args.mode == "drift" else check(args)


if __name__ == "__main__":
    main()

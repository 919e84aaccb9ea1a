"""The comparison a skeptical researcher asks for (issue 12): answer-only SFT vs ATLAS SFT (`vocab`)
vs ATLAS SFT (visual-op modules), then GRPO (alpha = 0) vs LA-GRPO (alpha > 0) from each ATLAS
checkpoint; same starting point (`pretrained.PERCEIVE_TINY`), data stream and budget for every arm,
several training seeds, every checkpoint scored on the same prompts.

    python bench/compare_atlas.py --root=/tmp/compare --seeds=0,1,2             # run (resumable), then report
    python bench/compare_atlas.py --root=/tmp/compare --seeds=0,1,2 --report    # report only
    python bench/compare_atlas.py --root=/tmp/compare --seeds=0 --set stages.sft.train.steps=300   # smaller budget
    python bench/compare_atlas.py --root=/tmp/select --arms=mixed+grpo,mixed+la_grpo   # RL that must pick the operation

Every arm is the main job's config (`configs/atlas_synthetic.py`: its SFT and LA-GRPO stages,
1000 SFT steps; 120 rollout batches of 8 prompts x 8 sampled at temperature 0.5; `ARM_DEFAULTS`:
the anchor's gradient share measured, the image-swap control on every prompt) with only what the
arm names changed:

    answer_only  SFT on "\\boxed{answer}" (data.sft_target=answer_only), visual-op modules built but unused
    vocab        ATLAS SFT, functional tokens as plain vocabulary rows (the paper exactly)
    module       ATLAS SFT, functional tokens that run the visual-op modules
    mixed        as module, but each SFT record is the trajectory or the answer-only response, half
                 each (data.sft_target=mixed): the policy must learn by RL where the operation helps
    <arm>+grpo / <arm>+la_grpo   RL from that seed's <arm> SFT checkpoint, rl.loss.alpha = 0 / the config's

`--arms` picks arms (an RL arm brings its SFT arm); the default is every arm but `mixed`'s.

The training seed (`seed`: new parameters, data order, rollouts) varies; the evaluation prompts
do not: every checkpoint is scored on the conditions' prompts of seed EVAL_SEED (greedy,
`run_config.eval_num_per_task` per family, image-swap control), so arms are compared prompt by
prompt.
Intervals are a two-level paired bootstrap (seeds, then prompts, resampled together for the arms
compared), 95%. Also reported: functional tokens per completion, the anchor term's share of the
gradient norm (LA-GRPO's metric `anchor/grad_share`, mean over rollout batches), and where the
completions' visual-op modules looked (the evaluation's localisation fields, when it writes them).
Each arm's workdir is ROOT/seed=S/ARM; a rerun skips what is done. Writes ROOT/compare.md and .json.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import sys
import time

import numpy as np

EVAL_SEED = 0  # the evaluation prompts' seed, shared by every arm and training seed
SFT_ARMS = {"answer_only": ("module", "answer_only"), "vocab": ("vocab", "trajectory"), "module": ("module", "trajectory"),
            "mixed": ("module", "mixed")}
RL_FROM = ("vocab", "module", "mixed")  # the SFT arms RL starts from
RL_KINDS = ("grpo", "la_grpo")
ARMS = tuple(SFT_ARMS) + tuple(f"{m}+{r}" for m in RL_FROM for r in RL_KINDS)
DEFAULT_ARMS = tuple(a for a in ARMS if not a.startswith("mixed"))
# Where the arms differ from the main job: they report the anchor term's share of the gradient, and
# the image-swap control on every scored prompt (paired across arms like the accuracy).
ARM_DEFAULTS = {"rl.anchor_share": True, "eval.image_swap_num_per_task": 0}
# Per-sample fields of an evaluation (eval_<tag>.json) averaged per arm when present.
SAMPLE_MEANS = ("op_target_share", "op_target_hit", "op_target_chance")


def _recipe(mode: str):
    spec = importlib.util.spec_from_file_location("atlas_synthetic", os.path.join(os.path.dirname(__file__), "..", "configs", "atlas_synthetic.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(mode)


def selected(names: list[str]) -> tuple[str, ...]:
    """`names` (arm names) with the SFT arm of each RL arm added, in ARMS order."""
    unknown = sorted(set(names) - set(ARMS))
    if unknown:
        raise SystemExit(f"--arms: unknown {unknown}; expected names among {list(ARMS)}")
    wanted = set(names) | {n.split("+")[0] for n in names}
    return tuple(a for a in ARMS if a in wanted)


def arms(seed: int, root: str, overrides: dict, names: tuple[str, ...] = DEFAULT_ARMS) -> list[dict]:
    """The arms `names` of one training seed, in the order they must run: {name, job, config, workdir}."""
    from atlas_jax import run_config

    seed_dir = os.path.join(root, f"seed={seed}")
    out = []
    for name, (mode, target) in SFT_ARMS.items():
        if name not in names:
            continue
        c = run_config.apply_overrides(_recipe(mode), {"seed": seed, "data.sft_target": target, **ARM_DEFAULTS, **overrides})
        out.append({"name": name, "job": "sft", "workdir": os.path.join(seed_dir, name),
                    "config": run_config.stage(c, "sft", **{"data.data_dir": os.path.join(root, "data")})})
    for sft_name in RL_FROM:
        c = run_config.apply_overrides(_recipe(SFT_ARMS[sft_name][0]), {"seed": seed, **ARM_DEFAULTS, **overrides})
        alpha = run_config.stage(c, "la_grpo").rl.loss.alpha
        if alpha <= 0:
            raise SystemExit(f"the recipe's rl.loss.alpha is {alpha}: LA-GRPO needs alpha > 0 to differ from GRPO")
        for rl_name, a in zip(RL_KINDS, (0.0, alpha)):
            name = f"{sft_name}+{rl_name}"
            if name not in names:
                continue
            out.append({"name": name, "job": "la_grpo", "workdir": os.path.join(seed_dir, name),
                        "config": run_config.stage(c, "la_grpo", **{"data.data_dir": os.path.join(root, "data"),
                                                                     "checkpoint.init_from": os.path.join(seed_dir, sft_name),
                                                                     "rl.loss.alpha": a})})
    return out


def _eval_path(arm: dict, condition: str) -> str:
    return os.path.join(arm["workdir"], f"eval_compare_{condition}.json")


def run_arm(arm: dict) -> None:
    """Trains the arm (skipped when its last checkpoint exists), then scores it on every condition
    not scored yet."""
    import jax

    from atlas_jax import builders, checkpoint, run_config
    from atlas_jax.jobs import evaluate, la_grpo, sft

    c = arm["config"]
    # Each checkpoint is scored below on the shared prompts; the trainer's own final evaluation
    # (on prompts of the training seed) would only cost time.
    train_c = run_config.apply_overrides(c, {"eval.num_per_task": 0})
    run_config.validate(train_c, jax.device_count())
    os.makedirs(arm["workdir"], exist_ok=True)
    with checkpoint.Checkpoints(arm["workdir"], read_only=True) as ckpts:
        done = ckpts.latest_step() == c.train.steps
    if not done:
        t0 = time.time()
        (sft if arm["job"] == "sft" else la_grpo).main(train_c, arm["workdir"])
        print(f"{arm['workdir']}: trained in {time.time() - t0:.0f} s", flush=True)
    eval_c = run_config.apply_overrides(c, {"seed": EVAL_SEED})
    missing = [cond for cond in c.eval.conditions if not os.path.exists(_eval_path(arm, cond))]
    if missing:
        mesh = builders.make_mesh(eval_c)
        policy = builders.load_policy(eval_c, arm["workdir"], mesh)
        for cond in missing:
            evaluate.evaluate(policy, eval_c, arm["workdir"], mesh, tag=f"compare_{cond}", split=cond)


# ----------------------------------------------------------------------------- report


def _load(root: str, seeds: list[int], names: list[str], conditions: tuple[str, ...]) -> tuple[dict, dict]:
    """({condition: {arm: {seed: {uid: sample}}}} of the arms' scored samples on disk, and the same
    nesting of each evaluation's functional tokens per completion)."""
    out = {cond: {name: {} for name in names} for cond in conditions}
    functional = {cond: {name: {} for name in names} for cond in conditions}
    for cond in conditions:
        for name in names:
            for seed in seeds:
                path = os.path.join(root, f"seed={seed}", name, f"eval_compare_{cond}.json")
                if os.path.exists(path):
                    with open(path) as f:
                        evaluation = json.load(f)
                    out[cond][name][seed] = {s["uid"]: s for s in evaluation["samples"]}
                    functional[cond][name][seed] = evaluation["results"]["functional_per_completion"]
    return out, functional


def _matrix(per_seed: dict, seeds: list[int], uids: list[str], key: str) -> np.ndarray:
    return np.array([[float(per_seed[s][u].get(key, 0.0)) for u in uids] for s in seeds])


def report(root: str, seeds: list[int], conditions: tuple[str, ...]) -> dict:
    from atlas_jax.jobs import results

    names = list(ARMS)
    data, functional = _load(root, seeds, names, conditions)
    out = {"seeds": seeds, "conditions": {}, "comparisons": {}, "arms": {}}
    for cond in conditions:
        rows = {}
        for name in names:
            done = [s for s in seeds if s in data[cond][name]]
            if not done:
                continue
            uids = sorted(set.intersection(*(set(data[cond][name][s]) for s in done)))
            acc = _matrix(data[cond][name], done, uids, "correct")
            swap = _matrix(data[cond][name], done, uids, "image_swap_correct")
            mean, interval = results.paired_bootstrap(acc)
            row = {"accuracy": mean, "interval": interval, "per_seed": acc.mean(axis=1).tolist(), "image_swap": float(swap.mean()),
                   "seeds": done, "prompts": len(uids)}
            row["functional_per_completion"] = float(np.mean([functional[cond][name][s] for s in done]))
            for key in SAMPLE_MEANS:
                vals = [float(data[cond][name][s][u][key]) for s in done for u in uids if key in data[cond][name][s][u]]
                if vals:
                    row[key] = float(np.mean(vals))
                    row[f"{key}_samples"] = len(vals)
            rows[name] = row
        out["conditions"][cond] = rows
        pairs = [("vocab", "answer_only"), ("module", "answer_only"), ("module", "vocab"), ("mixed", "module")]
        pairs += [(f"{m}+la_grpo", f"{m}+grpo") for m in RL_FROM] + [(f"{m}+{r}", m) for m in RL_FROM for r in RL_KINDS]
        comps = {}
        for a, b in pairs:
            common = [s for s in seeds if s in data[cond][a] and s in data[cond][b]]
            if not common:
                continue
            uids = sorted(set.intersection(*(set(data[cond][x][s]) for x in (a, b) for s in common)))
            diff, interval = results.paired_bootstrap(_matrix(data[cond][a], common, uids, "correct"), _matrix(data[cond][b], common, uids, "correct"))
            comps[f"{a} - {b}"] = {"difference": diff, "interval": interval, "seeds": common, "prompts": len(uids)}
        out["comparisons"][cond] = comps
    for name in names:
        info = {}
        for seed in seeds:
            d = os.path.join(root, f"seed={seed}", name)
            metrics = os.path.join(d, "metrics.jsonl")
            if name.endswith("la_grpo") and os.path.exists(metrics):
                with open(metrics) as f:
                    shares = [r["anchor/grad_share"] for r in map(json.loads, f) if "anchor/grad_share" in r]
                if shares:
                    info.setdefault("anchor_grad_share", []).append(float(np.mean(shares)))
        out["arms"][name] = {k: float(np.mean(v)) for k, v in info.items()}
    return out


def markdown(res: dict) -> str:
    lines = []
    for cond, rows in res["conditions"].items():
        lines += [f"### {cond}", "", "| arm | accuracy [95% CI] | per seed | image swap | functional / completion | anchor share | "
                  "module attention on target (chance) | argmax on target |", "|---|---|---|---|---|---|---|---|"]
        for name, r in rows.items():
            arm = res["arms"].get(name, {})
            loc = (f"{r['op_target_share']:.3f} ({r.get('op_target_chance', float('nan')):.3f})" if "op_target_share" in r else "-")
            hit = f"{r['op_target_hit']:.3f}" if "op_target_hit" in r else "-"
            lines.append(f"| {name} | {r['accuracy']:.3f} [{r['interval'][0]:.3f}, {r['interval'][1]:.3f}] | "
                         + " / ".join(f"{a:.3f}" for a in r["per_seed"]) + f" | {r['image_swap']:.3f} | "
                         f"{r['functional_per_completion']:.2f} | "
                         + (f"{arm['anchor_grad_share']:.4f}" if "anchor_grad_share" in arm else "-") + f" | {loc} | {hit} |")
        lines += ["", "| paired difference | mean [95% CI] | seeds x prompts |", "|---|---|---|"]
        for pair, d in res["comparisons"][cond].items():
            lines.append(f"| {pair} | {d['difference']:+.3f} [{d['interval'][0]:+.3f}, {d['interval'][1]:+.3f}] | "
                         f"{len(d['seeds'])} x {d['prompts']} |")
        lines.append("")
    return "\n".join(lines)


def _override(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise SystemExit(f"--set {text!r}: expected KEY=VALUE")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value  # a bare string


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a dotted config override applied to every arm (values parsed as in --config.KEY=VALUE)")
    parser.add_argument("--arms", default=",".join(DEFAULT_ARMS),
                        help=f"comma-separated arms to run, among {','.join(ARMS)} (an RL arm brings its SFT arm)")
    parser.add_argument("--report", action="store_true", help="only write the report of what is on disk")
    args = parser.parse_args(argv)
    import jax

    jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/atlas_jax/jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    import logging

    from atlas_jax import main as entry

    entry._console_logging()
    logging.getLogger("atlas_jax").setLevel("INFO")
    seeds = [int(s) for s in args.seeds.split(",")]
    overrides = dict(_override(kv) for kv in args.set)
    conditions = tuple(_recipe("module").eval.conditions)
    if not args.report:
        for seed in seeds:
            for arm in arms(seed, args.root, overrides, selected(args.arms.split(","))):
                run_arm(arm)
    res = report(args.root, seeds, conditions)
    with open(os.path.join(args.root, "compare.json"), "w") as f:
        json.dump(res, f, indent=1)
    table = markdown(res)
    with open(os.path.join(args.root, "compare.md"), "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main(sys.argv[1:])

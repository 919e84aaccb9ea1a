"""The rollout sampler: one jitted prefill + `lax.while_loop` decode over a preallocated KV cache.

`generate(graphdef, state, batch, rng, cfg)` samples `cfg.num_samples` (G) completions of every
left-padded prompt in `batch`. Everything runs in one compiled program whose shapes depend only
on the batch shapes and the static part of the config (`max_new_tokens`, `top_k`, `greedy`,
`num_samples`, `pad_id`, whether top-p is on, whether op maps are returned): a second batch of
the same shapes reuses it. Temperature, top-p and the stop ids are traced values, so changing
them does not recompile either (the stop ids are padded to `MAX_STOP_IDS` slots).

Steps, for a batch of B prompts of Tp tokens and N = max_new_tokens:
  1. prefill the prompts once (images, visual-op image memory) into a cache of Tp + N slots;
  2. repeat every cache row G times (row i*G + j is sample j of prompt i), so the vision tower
     and the prompt run once per prompt, not once per sample;
  3. sample token 0 from the prompt's last logits, then loop: feed token n-1 at M-RoPE
     position `next_position(prompt) + n - 1`, sample token n; stop when every row has
     produced a stop id or N tokens exist.
The rng of step n is `fold_in(rng, n)` (partitionable threefry: the same tokens on any mesh).

Log-probabilities returned per sampled token (both float32[B*G, N], 0 where `mask` is False):
  logprobs          log_softmax(logits / temperature)[token] (temperature 1 when greedy): the
                    tempered policy's log-prob with no top-k / top-p filtering, i.e. exactly what
                    the LA-GRPO trainer recomputes from a full forward at the same temperature
                    (use it as `old_logprobs`; TRL's convention). The filters are left out on both
                    sides: a sampled token always lies inside them, and the trainer's ratio
                    p_new / p_old is of the unfiltered tempered policy, 1 at the first update;
  sample_logprobs   the log-prob under the distribution actually sampled from (temperature,
                    then top-k, then top-p, as `transformers` orders its warpers); 0 when greedy.

Einsum letters: B prompts, R = B*G rows, T prompt tokens, N new tokens, V vocabulary,
P merged image tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from atlas_jax import sharding as shd
from atlas_jax.data.device_batch import model_inputs
from atlas_jax.model.layers import tensordot_rows
from atlas_jax.model.rope import next_position

MAX_STOP_IDS = 8


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to sample. The config section `rl.sample` maps onto the first four fields (defaults
    here); the job fills in the rest. top_k = 0 and top_p = 1.0 switch those filters off; greedy
    ignores temperature / top-k / top-p. stop_ids, pad_id: from the run's `tokenizer.RunTokens`.
    num_samples: completions per prompt (G)."""

    max_new_tokens: int = 96
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False
    stop_ids: tuple[int, ...] = ()
    pad_id: int = 0
    num_samples: int = 1
    return_op_attention: bool = False

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: expected >= 1")
        if not self.greedy and not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature}: expected > 0 (or greedy=True)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}: expected >= 0 (0 = off)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p}: expected in (0, 1]")
        if self.num_samples < 1:
            raise ValueError(f"num_samples={self.num_samples}: expected >= 1")
        if len(self.stop_ids) > MAX_STOP_IDS:
            raise ValueError(f"SamplingConfig.stop_ids has {len(self.stop_ids)} ids: at most {MAX_STOP_IDS} are supported")

    def program(self) -> SamplingConfig:
        """The compiled sampler's static argument: this config with the values the program takes
        as traced inputs (temperature, top-p, stop ids) set to placeholders, so configs differing
        only in those share one program. top_p keeps only whether the filter is on."""
        return dataclasses.replace(self, temperature=1.0, top_p=1.0 if self.top_p == 1.0 else 0.5, stop_ids=())


# ------------------------------------------------------------------ filters
def top_k_filter(logits_rv: jax.Array, k: int) -> jax.Array:
    """Logits with everything below the k-th largest set to -inf (k = 0: unchanged).
    Ties with the k-th value are kept, as `transformers`' TopKLogitsWarper does."""
    if k <= 0 or k >= logits_rv.shape[-1]:
        return logits_rv
    kth_r1 = jax.lax.top_k(logits_rv, k)[0][..., -1:]
    return jnp.where(logits_rv < kth_r1, -jnp.inf, logits_rv)


def top_p_filter(logits_rv: jax.Array, top_p: jax.Array | float) -> jax.Array:
    """Logits outside the nucleus set to -inf: the smallest set of most-probable tokens whose
    probability reaches `top_p` (the most probable token is always kept)."""
    order_rv = jnp.argsort(-logits_rv, axis=-1, stable=True)
    sorted_rv = jnp.take_along_axis(logits_rv, order_rv, axis=-1)
    probs_rv = jax.nn.softmax(sorted_rv, axis=-1)
    # Keep a token while the mass strictly before it is below top_p.
    before_rv = jnp.cumsum(probs_rv, axis=-1) - probs_rv
    keep_sorted_rv = (before_rv < top_p).at[..., 0].set(True)
    rows = jnp.arange(logits_rv.shape[0])[:, None]
    keep_rv = jnp.zeros(logits_rv.shape, bool).at[rows, order_rv].set(keep_sorted_rv)
    return jnp.where(keep_rv, logits_rv, -jnp.inf)


def _pick(logits_rv, key, temperature, top_p, cfg: SamplingConfig):
    """One token per row: int32[R] and its two log-probs float32[R] (see module docstring)."""
    logp_rv = jax.nn.log_softmax(logits_rv if cfg.greedy else logits_rv / temperature, axis=-1)
    if cfg.greedy:
        tok_r = jnp.argmax(logits_rv, axis=-1).astype(jnp.int32)
        sample_lp_r = jnp.zeros(tok_r.shape, jnp.float32)
    else:
        x_rv = top_k_filter(logits_rv / temperature, cfg.top_k)
        if cfg.top_p < 1.0:
            x_rv = top_p_filter(x_rv, top_p)
        tok_r = jax.random.categorical(key, x_rv, axis=-1).astype(jnp.int32)
        sample_lp_r = jnp.take_along_axis(jax.nn.log_softmax(x_rv, axis=-1), tok_r[:, None], axis=-1)[:, 0]
    lp_r = jnp.take_along_axis(logp_rv, tok_r[:, None], axis=-1)[:, 0]
    return tok_r, lp_r, sample_lp_r


# ------------------------------------------------------------------ batch helpers
def repeat_rows(x: jax.Array, times: int) -> jax.Array:
    """Row i of `x` becomes rows i*times .. i*times + times-1 (the sampler's row order)."""
    return x if times == 1 else jnp.repeat(x, times, axis=0)


# ------------------------------------------------------------------ the program
def _generate(graphdef, state, inputs, rng, temperature, top_p, stop_ids, cfg: SamplingConfig, mesh):
    model = nnx.merge(graphdef, state)
    (ids_bt, pos_b3t, mask_bt), images = inputs
    mask_bt = mask_bt.astype(bool)
    B, T = ids_bt.shape
    G, N = cfg.num_samples, cfg.max_new_tokens
    R = B * G
    # The loop carry keeps its rows sharded like the inputs; other axes stay free, so the KV
    # cache may follow the kv-heads' tensor sharding.
    keep = lambda x: shd.constrain_rows(x, mesh)  # noqa: E731

    cache = jax.tree.map(keep, model.init_cache(B, T + N))
    hidden_btd, cache, _ = model(ids_bt, pos_b3t, mask_bt, **images, cache=cache, head=False)
    # Left padding: the last column is every prompt's last real token; only it needs logits
    # (the model's head, on one position instead of a [B, T, V] array).
    logits_rv = keep(repeat_rows(tensordot_rows(hidden_btd[:, -1], model.output_head(), 1).astype(jnp.float32), G))
    cache = jax.tree.map(lambda x: keep(repeat_rows(x, G)) if x.ndim else x, cache)
    start_r = repeat_rows(next_position(pos_b3t, mask_bt).astype(jnp.int32), G)

    def is_stop(tok_r):
        return (tok_r[:, None] == stop_ids[None, :]).any(axis=-1)

    tok_r, lp_r, slp_r = _pick(logits_rv, jax.random.fold_in(rng, 0), temperature, top_p, cfg)
    tokens_rn = jnp.full((R, N), cfg.pad_id, jnp.int32).at[:, 0].set(tok_r)
    logprobs_rn = jnp.zeros((R, N), jnp.float32).at[:, 0].set(lp_r)
    sample_lp_rn = jnp.zeros((R, N), jnp.float32).at[:, 0].set(slp_r)
    mask_rn = jnp.zeros((R, N), bool).at[:, 0].set(True)
    done_r = is_stop(tok_r)
    carry = dict(n=jnp.ones((), jnp.int32), tok=tok_r, done=done_r, cache=cache, tokens=tokens_rn,
                 logprobs=logprobs_rn, sample_logprobs=sample_lp_rn, mask=mask_rn)
    if cfg.return_op_attention:
        n_img = cache.memory.k.shape[1]
        carry["op_attn"] = jnp.zeros((R, N, n_img), jnp.float32)
        carry["op"] = jnp.full((R, N), -1, jnp.int32)
    carry = jax.tree.map(keep, carry)

    def cond(c):
        return (c["n"] < N) & ~c["done"].all()

    def body(c):
        n = c["n"]
        # Feed token n-1 (slot T + n-1) and read the distribution of token n.
        pos_r31 = jnp.broadcast_to((start_r + n - 1)[:, None, None], (R, 3, 1))
        logits_r1v, cache, aux = model(c["tok"][:, None], pos_r31, jnp.ones((R, 1), bool), cache=c["cache"])
        tok_r, lp_r, slp_r = _pick(logits_r1v[:, 0], jax.random.fold_in(rng, n), temperature, top_p, cfg)
        live_r = ~c["done"]
        tok_r = jnp.where(live_r, tok_r, cfg.pad_id)
        out = dict(c, n=n + 1, tok=tok_r, done=c["done"] | is_stop(tok_r), cache=cache)
        out["tokens"] = c["tokens"].at[:, n].set(tok_r)
        out["logprobs"] = c["logprobs"].at[:, n].set(jnp.where(live_r, lp_r, 0.0))
        out["sample_logprobs"] = c["sample_logprobs"].at[:, n].set(jnp.where(live_r, slp_r, 0.0))
        out["mask"] = c["mask"].at[:, n].set(live_r)
        if cfg.return_op_attention:
            # The op of the token fed at this step (token n-1) acts here, inside the model.
            fed_live_r = c["mask"][:, n - 1]
            out["op_attn"] = c["op_attn"].at[:, n - 1].set(jnp.where(fed_live_r[:, None], aux["ops"]["attn"][:, 0], 0.0))
            out["op"] = c["op"].at[:, n - 1].set(jnp.where(fed_live_r, aux["ops"]["op"][:, 0], -1))
        return jax.tree.map(keep, out)

    c = jax.lax.while_loop(cond, body, carry)
    result = {
        "tokens": c["tokens"],
        "logprobs": c["logprobs"],
        "sample_logprobs": c["sample_logprobs"],
        "mask": c["mask"],
        "lengths": c["mask"].sum(axis=1).astype(jnp.int32),
        "prompt_ids": repeat_rows(ids_bt, G),
        "prompt_mask": repeat_rows(mask_bt, G),
        "prompt_positions": repeat_rows(pos_b3t, G),
        "positions": jnp.broadcast_to((start_r[:, None] + jnp.arange(N, dtype=jnp.int32))[:, None], (R, 3, N)),
        "steps": c["n"],
    }
    if cfg.return_op_attention:
        result["op_attention"] = c["op_attn"]
        result["op"] = c["op"]
    return result


_generate_jit = jax.jit(_generate, static_argnames=("graphdef", "cfg", "mesh"))


def _mesh_of(x) -> object | None:
    s = getattr(x, "sharding", None)
    return s.mesh if isinstance(s, NamedSharding) and s.mesh.size > 1 else None


def generate(graphdef, state, batch: Mapping, rng: jax.Array | None, cfg: SamplingConfig) -> dict[str, jax.Array]:
    """Samples `cfg.num_samples` (G) completions for each of the B left-padded prompts.

    graphdef, state: `nnx.split(model)` of a `VLM`. batch: `input_ids` int32[B, Tp],
    `attention_mask` bool[B, Tp] (left padding), `positions` int32[B, 3, Tp], optionally
    `pixel_values` float[B, Pp, C] + the layout arrays (`device_batch.model_inputs`). When the
    inputs are `NamedSharding`-sharded over a mesh, the cache and the loop follow their batch
    sharding. rng: a PRNG key (may be None when greedy).

    Returns, for R = B*G rows (row i*G + j is sample j of prompt i):
      tokens            int32[R, N]    pad_id after the stop token / end
      logprobs          float32[R, N]  policy log-prob (tempered, unfiltered)
      sample_logprobs   float32[R, N]  log-prob under the filtered, tempered sampling distribution
      mask              bool[R, N]     real completion tokens, the stop token included
      lengths           int32[R]
      positions         int32[R, 3, N] M-RoPE positions of the completion tokens
      prompt_ids        int32[R, Tp], prompt_mask bool[R, Tp], prompt_positions int32[R, 3, Tp]
      steps             int32          decode steps run (N, or fewer when every row stopped)
    and with `cfg.return_op_attention` (model with visual ops): `op_attention`
    float32[R, N, P], the visual-op attention over the prompt's merged image tokens of each
    completion token, and `op` int32[R, N] its operation (-1: not functional). A token's op
    acts when it is fed back, so a functional token at the last position N-1 has no map.
    """
    args, static = program_arguments(graphdef, state, batch, rng, cfg)
    return _generate_jit(*args, **static)


def program_arguments(graphdef, state, batch: Mapping, rng: jax.Array | None, cfg: SamplingConfig) -> tuple[tuple, dict]:
    """(traced, static) arguments of the one sampler program `_generate_jit` for `generate`'s
    inputs, validated; the compile check lowers the program with them."""
    inputs = model_inputs(batch)
    if cfg.return_op_attention:
        if "visual_ops" not in state:
            raise ValueError("SamplingConfig.return_op_attention=True needs a model with visual ops (visual_ops.mode='module')")
        if "pixel_values" not in inputs[1]:
            raise ValueError("SamplingConfig.return_op_attention=True needs images in the batch (pixel_values)")
    if rng is None:
        if not cfg.greedy:
            raise ValueError("generate: rng is None but SamplingConfig.greedy=False; pass a PRNG key")
        rng = jax.random.key(0)
    stop = np.full((MAX_STOP_IDS,), -1, np.int32)
    stop[: len(cfg.stop_ids)] = cfg.stop_ids
    args = (graphdef, state, inputs, rng, jnp.float32(cfg.temperature), jnp.float32(cfg.top_p), jnp.asarray(stop))
    return args, {"cfg": cfg.program(), "mesh": _mesh_of(inputs[0][0])}


def compiled_memory(graphdef, state, batch: Mapping, rng: jax.Array | None, cfg: SamplingConfig):
    """The compiled sampler program's `memory_analysis()` for `generate`'s inputs (None where the
    backend reports none): the job logs it at start."""
    args, static = program_arguments(graphdef, state, batch, rng, cfg)
    return _generate_jit.lower(*args, **static).compile().memory_analysis()


def sample_model(model, batch: Mapping, rng: jax.Array, cfg: SamplingConfig) -> dict[str, jax.Array]:
    """`generate` for an NNX model object (splits it first)."""
    graphdef, state = nnx.split(model)
    return generate(graphdef, state, batch, rng, cfg)

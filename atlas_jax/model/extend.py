"""Give a model its functional tokens: tokenizer entries, vocabulary rows and visual-op modules.

`add_functional_tokens(model, tok)` returns a new sharded model whose config names the
tokens' ids: the embedding table and output head gain rows (spare rows are reused, otherwise
the tables grow to a multiple of 128), each new row is the mean embedding of the token's
descriptive words, and — in 'module' mode — one visual-operation module per token is added with
its gate at zero, so the extended model computes exactly what the base model did on any text
without functional tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
from flax import nnx

from atlas_jax import sharding as shd
from atlas_jax import tokenizer as tokenizer_lib
from atlas_jax.functional_tokens import DEFAULT_TOKENS, FunctionalToken
from atlas_jax.model import functional_rows, presets
from atlas_jax.model.vlm import VLM


def add_functional_tokens(
    model: VLM,
    tok,
    tokens: Sequence[FunctionalToken] = DEFAULT_TOKENS,
    *,
    mode: str = "module",
    layer: int | None = None,
    rules=shd.RULES,
    seed: int = 0,
    **op_kw,
) -> VLM:
    """A copy of `model` extended with `tokens` (the tokenizer `tok` is extended in place).

    mode: 'module' (visual-op modules) or 'vocab' (rows only: the paper's setting).
    layer / op_kw: where the modules write and their size (see `presets.with_visual_ops`).
    """
    ids = tokenizer_lib.add_functional_tokens(tok, tokens)
    word_ids = functional_rows.word_token_ids(tok, tokens)
    old_cfg = model.cfg
    vocab = functional_rows.plan_rows(ids, old_cfg.text.vocab_size)
    cfg = dataclasses.replace(old_cfg, text=dataclasses.replace(old_cfg.text, vocab_size=vocab))
    cfg = presets.with_visual_ops(cfg, ids, mode=mode, layer=layer, **op_kw)

    mesh = model.embed.embedding[...].sharding.mesh
    abstract = nnx.eval_shape(lambda: VLM(cfg, rngs=nnx.Rngs(seed)))
    graphdef, abstract_state = nnx.split(abstract)
    shardings = dict(nnx.to_flat_state(shd.state_shardings(abstract_state, mesh, rules)))
    old = dict(nnx.to_flat_state(nnx.state(model)))

    def grown(path, transpose):
        sh = shardings[path].get_value()
        fn = lambda t: functional_rows.init_rows(t.T if transpose else t, ids, word_ids, vocab)
        out = jax.jit(lambda t: fn(t).T if transpose else fn(t), out_shardings=sh)
        return out(old[path].get_value())

    ops = None
    if cfg.visual_ops.enabled:
        from atlas_jax.model.visual_ops import VisualOps

        ops = dict(nnx.to_flat_state(nnx.state(shd.sharded_init(lambda: VisualOps(cfg, rngs=nnx.Rngs(seed)), mesh, rules))))

    leaves = []
    for path, var in nnx.to_flat_state(abstract_state):
        if path == ("embed", "embedding"):
            value = grown(path, transpose=False)
        elif path == ("lm_head", "kernel"):
            value = grown(path, transpose=True)
        elif path[0] == "visual_ops":
            value = ops[path[1:]].get_value()
        else:
            value = old[path].get_value()
        leaves.append((path, var.replace(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))

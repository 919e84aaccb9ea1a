"""Chunked target log-probs equal the dense head's, values and gradients, in float32: on random
arrays (chunks that do and do not divide T) and through the tiny model, tied head or not, with
functional-token rows among the targets."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from atlas_jax import sharding
from atlas_jax.data.device_batch import model_inputs
from atlas_jax.model import vlm
from atlas_jax.train.token_logprobs import target_logprobs
from hf_model_fixture import example, jax_batch
from test_kv_cache import FUNC, tiny_cfg


def dense_logprobs(logits_btv, targets_bt):
    """The dense form: float32 log-softmax over the whole [B, T, V], then the target's entry."""
    logp_btv = jax.nn.log_softmax(logits_btv.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp_btv, targets_bt[..., None], axis=-1)[..., 0], jnp.argmax(logits_btv, -1) == targets_bt


@pytest.mark.parametrize("chunk", [4, 5, 13, 64])
def test_values_and_gradients_equal_the_dense_form(chunk):
    k = jax.random.split(jax.random.key(0), 4)
    B, T, D, V = 3, 13, 16, 50
    h = jax.random.normal(k[0], (B, T, D))
    w = jax.random.normal(k[1], (D, V)) * 0.5
    targets = jax.random.randint(k[2], (B, T), 0, V)
    weights = jax.random.uniform(k[3], (B, T))

    def chunked(h, w):
        logp, hit = target_logprobs(h, w, targets, chunk=chunk)
        return jnp.sum(weights * logp), (logp, hit)

    def dense(h, w):
        logp, hit = dense_logprobs(h @ w, targets)
        return jnp.sum(weights * logp), (logp, hit)

    (_, (logp, hit)), grads = jax.value_and_grad(chunked, argnums=(0, 1), has_aux=True)(h, w)
    (_, (ref_logp, ref_hit)), ref_grads = jax.value_and_grad(dense, argnums=(0, 1), has_aux=True)(h, w)
    assert logp.shape == (B, T) and logp.dtype == jnp.float32
    np.testing.assert_allclose(logp, ref_logp, rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(hit, ref_hit)
    assert hit.any()  # the argmax comparison is exercised both ways
    for g, ref in zip(grads, ref_grads):
        np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tied", [False, True], ids=["lm_head", "tied"])
def test_model_hidden_states_and_output_head_give_the_dense_logprobs(tied):
    cfg = tiny_cfg("vocab")  # the functional tokens as vocabulary rows (the visual-op modules play no part in the head)
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, tie_word_embeddings=tied))
    model = vlm.create(cfg, sharding.make_mesh((1, 1, 1), jax.devices()[:1]), seed=3)
    assert (model.lm_head is None) == tied
    rng = np.random.default_rng(0)
    examples = []
    for n in (3, 5):
        e = example(rng, n, [(1, 4, 4)], 3)
        e.ids += [FUNC[0], 5, FUNC[2], 7, FUNC[1]]  # functional-token rows among the targets
        examples.append(e)
    batch = {k: jnp.asarray(v) for k, v in jax_batch(examples, cfg, pad_left=False).items()}
    args, kw = model_inputs(batch)
    targets = batch["input_ids"][:, 1:]
    mask = batch["attention_mask"][:, 1:]
    graphdef, params = nnx.split(model)

    def chunked(p):
        m = nnx.merge(graphdef, p)
        h, _, _ = m(*args, head=False, **kw)
        logp, _ = target_logprobs(h[:, :-1], m.output_head(), targets, chunk=8)
        return jnp.sum(jnp.where(mask, logp, 0.0)), logp

    def dense(p):
        logits, _, _ = nnx.merge(graphdef, p)(*args, **kw)
        logp, _ = dense_logprobs(logits[:, :-1], targets)
        return jnp.sum(jnp.where(mask, logp, 0.0)), logp

    @jax.jit
    def both(p):  # one program: one compile
        return jax.value_and_grad(chunked, has_aux=True)(p), jax.value_and_grad(dense, has_aux=True)(p)

    ((_, logp), grads), ((_, ref_logp), ref_grads) = both(params)
    np.testing.assert_allclose(logp, ref_logp, rtol=1e-5, atol=1e-5)
    assert np.isin(np.asarray(targets), FUNC).sum() == 6
    flat, ref_flat = jax.tree.leaves(grads), jax.tree.leaves(ref_grads)
    assert len(flat) == len(ref_flat)
    for g, ref in zip(flat, ref_flat):
        np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-6)

"""`tempered_logprobs_entropy` (chunked) equals the dense tempered softmax, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atlas_jax.train.token_logprobs import tempered_logprobs_entropy


@pytest.mark.parametrize("temperature,chunk", [(0.7, 4), (1.0, 16), (1.3, 3)])
def test_chunked_tempered_logprobs_and_entropy_equal_the_dense_form(temperature, chunk):
    rng = np.random.default_rng(0)
    B, T, D, V = 2, 10, 8, 32
    h = jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32)
    head = jnp.asarray(rng.standard_normal((D, V)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)

    def dense(h, head):
        logp_btv = jax.nn.log_softmax(jnp.einsum("btd,dv->btv", h, head) / temperature, axis=-1)
        picked = jnp.take_along_axis(logp_btv, targets[..., None], axis=-1)[..., 0]
        return picked, -jnp.sum(jnp.exp(logp_btv) * logp_btv, axis=-1)

    def chunked(h, head):
        return tempered_logprobs_entropy(h, head, targets, temperature, chunk=chunk)

    for got, want in zip(chunked(h, head), dense(h, head)):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    # Entropy of a softmax over V tokens lies in [0, log V].
    assert (np.asarray(chunked(h, head)[1]) <= np.log(V) + 1e-5).all()

    def objective(fn):
        return lambda h, head: jnp.sum(fn(h, head)[0] * 0.3 + fn(h, head)[1] * 0.7)

    for got, want in zip(jax.grad(objective(chunked), argnums=(0, 1))(h, head), jax.grad(objective(dense), argnums=(0, 1))(h, head)):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)

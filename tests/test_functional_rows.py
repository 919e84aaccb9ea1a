"""Row planning and initialisation for the functional tokens. References: the Qwen2.5-VL table sizes, HF's
`resize_token_embeddings(pad_to_multiple_of=...)` for the grown size, the HF tokenizer's own vocabulary
lookups for the word ids, and per-row numpy means computed here independently of `init_rows`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from atlas_jax import tokenizer as T
from atlas_jax.functional_tokens import DEFAULT_TOKENS
from atlas_jax.model.functional_rows import init_rows, plan_rows, word_token_ids
from hf_tokenizer_fixture import hf_tokenizer, hf_tokenizer_path  # noqa: F401


def test_plan_rows_uses_spare_rows():
    # Qwen2.5-VL: 151665 tokenizer entries, 152064 table rows; the five new ids land in spare rows.
    assert plan_rows(range(151665, 151670), 152064) == 152064
    assert plan_rows([1023], 1024) == 1024
    assert plan_rows([], 1000) == 1000


@pytest.mark.parametrize("vocab, new_ids", [(1024, [1024, 1028]), (1000, [1000]), (637, [637, 641]), (256, [1300])])
def test_plan_rows_grows_like_hf_resize(vocab, new_ids):
    """HF pads a resized embedding to the multiple it is given; we pad max_id + 1 to 128."""
    model = Qwen2ForCausalLM(
        Qwen2Config(vocab_size=vocab, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    )
    emb = model.resize_token_embeddings(max(new_ids) + 1, pad_to_multiple_of=128, mean_resizing=False)
    assert plan_rows(new_ids, vocab) == emb.weight.shape[0]
    assert plan_rows(new_ids, vocab) % 128 == 0 and plan_rows(new_ids, vocab) > max(new_ids)


def test_plan_rows_rejects_bad_input():
    with pytest.raises(ValueError, match="negative"):
        plan_rows([-1], 10)
    with pytest.raises(ValueError, match="vocab_size"):
        plan_rows([1], 0)


def test_word_token_ids_are_the_words_vocabulary_entries(hf_tokenizer):
    words = word_token_ids(hf_tokenizer)
    assert len(words) == len(DEFAULT_TOKENS)
    vocab = hf_tokenizer.get_vocab()
    for t, ids in zip(DEFAULT_TOKENS, words):
        assert len(ids) == len(set(ids))
        for w in t.words:
            for form in (w, "Ġ" + w):  # byte-level spelling of " word"
                if form in vocab:  # a word of the corpus is a single BPE entry
                    assert vocab[form] in ids, form
        # Only word pieces, never a control or functional token.
        assert not set(ids) & set(hf_tokenizer.added_tokens_decoder)
    # "line" and " line" are whole entries in the fixture's vocabulary.
    assert words[1][:2] == [vocab["line"], vocab["Ġline"]]


def reference_rows(table, new_ids, word_ids, new_vocab):
    """Independent per-row computation in float64."""
    t = np.asarray(table, dtype=np.float64)
    out = np.empty((new_vocab, t.shape[1]))
    out[: len(t)] = t
    out[len(t) :] = t.mean(axis=0)
    for i, ws in zip(new_ids, word_ids):
        out[i] = np.mean([t[w] for w in ws], axis=0)
    return out


@pytest.mark.parametrize("new_vocab", [40, 128])
def test_init_rows_numpy(new_vocab):
    rng = np.random.default_rng(0)
    table = rng.normal(size=(40, 6)).astype(np.float32)
    before = table.copy()
    new_ids, word_ids = [35, 38, 39], [[1, 2, 3], [5], [2, 35]]  # 35 is both a word and a new id: old value used
    if new_vocab > 40:
        new_ids = [40, 44, 127]
    out = init_rows(table, new_ids, word_ids, new_vocab)
    np.testing.assert_array_equal(table, before)  # pure
    assert out.shape == (new_vocab, 6) and out.dtype == np.float32 and isinstance(out, np.ndarray)
    ref = reference_rows(table, new_ids, word_ids, new_vocab)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
    untouched = [i for i in range(40) if i not in new_ids]
    np.testing.assert_array_equal(out[untouched], table[untouched])


def test_init_rows_jax_bf16_and_transposed_head():
    rng = np.random.default_rng(1)
    head_dv = rng.normal(size=(6, 50)).astype(np.float32)
    new_ids, word_ids = [50, 52], [[0, 7], [9, 10, 11]]
    out_dv = init_rows(jnp.asarray(head_dv).T, new_ids, word_ids, 128).T
    assert isinstance(out_dv, jax.Array) and out_dv.shape == (6, 128)
    np.testing.assert_allclose(np.asarray(out_dv).T, reference_rows(head_dv.T, new_ids, word_ids, 128), rtol=1e-6, atol=1e-6)

    table = jnp.asarray(head_dv.T, dtype=jnp.bfloat16)
    out = init_rows(table, new_ids, word_ids, 128)
    assert out.dtype == jnp.bfloat16
    ref = reference_rows(np.asarray(table.astype(jnp.float32)), new_ids, word_ids, 128)
    np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), ref, rtol=1e-2, atol=1e-2)
    np.testing.assert_array_equal(np.asarray(out[:50]), np.asarray(table))

    jitted = jax.jit(lambda t: init_rows(t, new_ids, word_ids, 128))(jnp.asarray(head_dv.T))
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(init_rows(head_dv.T, new_ids, word_ids, 128)), rtol=1e-6)


def test_init_rows_with_the_tokenizer(hf_tokenizer):
    """End to end: ids from the tokenizer, rows planned, the embedding of each functional token = its word mean."""
    f_ids = T.functional_token_ids(hf_tokenizer)
    words = word_token_ids(hf_tokenizer)
    bpe_plus_control = min(f_ids)
    table = np.random.default_rng(2).normal(size=(bpe_plus_control, 4)).astype(np.float32)
    new_vocab = plan_rows(f_ids, bpe_plus_control)
    assert new_vocab == 640  # 637 tokens -> 5 * 128
    out = init_rows(table, f_ids, words, new_vocab)
    for i, ws in zip(f_ids, words):
        np.testing.assert_allclose(out[i], table[ws].mean(axis=0), rtol=1e-6)


def test_init_rows_errors():
    table = np.zeros((10, 2), np.float32)
    with pytest.raises(ValueError, match="one list per id"):
        init_rows(table, [10], [], 128)
    with pytest.raises(ValueError, match="smaller"):
        init_rows(table, [], [], 5)
    with pytest.raises(ValueError, match="outside"):
        init_rows(table, [200], [[1]], 128)
    with pytest.raises(ValueError, match="existing rows"):
        init_rows(table, [11], [[10]], 128)
    with pytest.raises(ValueError, match="repeat"):
        init_rows(table, [11, 11], [[1], [2]], 128)

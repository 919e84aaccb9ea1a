"""Vocabulary rows for the functional tokens: how many rows the tables need, and what the new rows hold.

Array-level and pure, so the same code serves the embedding table `float[V, D]` and the output head
(stored `float[D, V]`: pass `head_dv.T`, transpose the result back), numpy arrays (checkpoint
conversion) and jax arrays (inside a jitted, sharded init).

Rows are planned in two cases (DESIGN §2):
  - spare rows: Qwen2.5-VL's tables hold 152064 rows for 151665 tokenizer entries, so the five new ids
    (151665..151669) already have rows and the table size stays;
  - growth: a table too small for the new ids grows to max_id + 1, rounded up to a multiple of 128
    (friendly to the `tensor`-sharded vocabulary axis and to TPU tiles).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from atlas_jax.functional_tokens import DEFAULT_TOKENS, FunctionalToken

ROW_MULTIPLE = 128


def plan_rows(token_ids: Sequence[int], vocab_size: int) -> int:
    """The table size that holds every id in token_ids: vocab_size when they fit, else grown and padded."""
    if vocab_size <= 0:
        raise ValueError(f"plan_rows: vocab_size={vocab_size}; expected a positive table size")
    if any(int(i) < 0 for i in token_ids):
        raise ValueError(f"plan_rows: token ids {list(token_ids)} include a negative id")
    needed = max((int(i) for i in token_ids), default=-1) + 1
    if needed <= vocab_size:
        return vocab_size
    return -(-needed // ROW_MULTIPLE) * ROW_MULTIPLE


def word_token_ids(tok, tokens: Sequence[FunctionalToken] = DEFAULT_TOKENS) -> list[list[int]]:
    """Per functional token, the ids of its descriptive words, each encoded as "word" and " word" (the form it
    takes mid-sentence), as plain text, deduplicated in first-seen order."""
    # Imported here so the model package does not need the tokenizer stack (transformers) to import.
    from atlas_jax.tokenizer import encode_untrusted

    out = []
    for t in tokens:
        ids: list[int] = []
        for word in t.words:
            for form in (word, " " + word):
                for i in encode_untrusted(tok, form):
                    if i not in ids:
                        ids.append(i)
        if not ids:
            raise ValueError(f"word_token_ids: functional token {t.token!r} has no descriptive words to encode")
        out.append(ids)
    return out


def init_rows(table_vd, new_ids: Sequence[int], word_ids: Sequence[Sequence[int]], new_vocab: int):
    """A copy of table_vd with new_vocab rows, where row new_ids[i] = mean of the rows word_ids[i].

    table_vd: float[V, D] (numpy or jax; the result has the same type and dtype).
    new_ids: the functional tokens' ids, each < new_vocab; may lie inside V (spare rows are overwritten).
    word_ids: per new id, the existing rows (< V) whose mean initialises it.
    new_vocab: rows of the result, >= V (from `plan_rows`).
    Returns float[new_vocab, D]. Rows added by growth that no functional token takes hold the mean of all V
    existing rows (as HF's `resize_token_embeddings` centres new rows): as output-head rows they then score
    an average logit rather than 0, which in a trained model can rank far above the real tokens.
    Other existing rows are unchanged.
    """
    vocab, dim = table_vd.shape
    if len(new_ids) != len(word_ids):
        raise ValueError(
            f"init_rows: {len(new_ids)} new ids but {len(word_ids)} word-id lists; expected one list per id"
        )
    if new_vocab < vocab:
        raise ValueError(f"init_rows: new_vocab={new_vocab} is smaller than the table's {vocab} rows")
    for token_id, words in zip(new_ids, word_ids):
        if not 0 <= int(token_id) < new_vocab:
            raise ValueError(f"init_rows: new id {token_id} is outside the {new_vocab}-row table")
        if not words or not all(0 <= int(w) < vocab for w in words):
            raise ValueError(
                f"init_rows: word ids {list(words)} for new id {token_id} must be non-empty and index "
                f"the {vocab} existing rows"
            )
    if len(set(int(i) for i in new_ids)) != len(new_ids):
        raise ValueError(f"init_rows: new ids {list(new_ids)} repeat an id")
    xp = jnp if isinstance(table_vd, jax.Array) else np
    # Means in (at least) float32: bfloat16 sums over a 150k-row table lose most of their digits.
    table32 = table_vd.astype(xp.promote_types(table_vd.dtype, xp.float32))
    if new_vocab > vocab:
        fill_nd = xp.broadcast_to(table32.mean(axis=0, keepdims=True), (new_vocab - vocab, dim))
        table32 = xp.concatenate([table32, fill_nd], axis=0)
    if new_ids:
        # Read the word rows before any write, so a word row that is also a new id uses its old value.
        means_nd = xp.stack([table32[np.asarray(list(w), dtype=np.int32)].mean(axis=0) for w in word_ids])
        rows = np.asarray(list(new_ids), dtype=np.int32)
        if xp is jnp:
            table32 = table32.at[rows].set(means_nd)
        else:
            table32[rows] = means_nd
    return table32.astype(table_vd.dtype)

"""A small Qwen2.5-VL-format tokenizer for tests, trained offline on a fixed English corpus.

    from hf_tokenizer_fixture import make_tokenizer, tokenizer_dir  # tests/ is on sys.path under pytest
    tok = make_tokenizer(tmp_path)                   # with the five functional tokens after the 14 control tokens
    tok = make_tokenizer(tmp_path, functional=False) # the 14 Qwen control tokens only

The BPE is trained once per directory and process (saved under `tmp_dir`); every call returns a fresh
tokenizer loaded from disk, so a test that mutates its tokenizer cannot leak into another test.
The pytest fixtures `hf_tokenizer` / `hf_tokenizer_path` share one session-wide directory.
"""

from __future__ import annotations

import functools
import os

import pytest

from atlas_jax import tokenizer as tokenizer_lib

# Covers the functional tokens' descriptive words (so they are whole BPE tokens) and the vocabulary of
# the synthetic tasks: counting, geometry, arrows, labels, zoomed details, boxed answers.
CORPUS: tuple[str, ...] = (
    "Draw a line from A to B and draw the auxiliary line segment through the point.",
    "The arrow points in the direction of the red circle; follow each arrow to its target.",
    "Mark the shape: outline the region with a box and count the objects inside the region.",
    "Add a text label with the number next to each point, then write the total.",
    "Zoom in, crop the view and rotate it to read the small detail in the corner.",
    "How many circles are inside the marked region? Count them one by one.",
    "The triangle ABC has base BC = 6 and height 4, so the area is 12.",
    "I draw the height from A to BC, so the area is half of base times height.",
    "Which shape does the arrow point to: the square, the triangle or the circle?",
    "The label reads 7 and the other label reads 15, so the sum of the numbers is 22.",
    "Look at the image carefully and answer the question with a single word or number.",
    "Answer: \\boxed{3}. The answer is \\boxed{B}. Final answer \\boxed{12.5}",
    "There are 2 red squares, 3 blue triangles and 4 green circles in the picture.",
    "Options: (A) left (B) right (C) up (D) down. Choose the correct option.",
    "The small digit in the top-left corner is 9; zooming in makes it readable.",
    "First, I outline the region. Second, I label every object. Finally, I count.",
    "Question: what is the length of the segment? Think step by step.",
    "You are a helpful assistant. The user shows an image and asks a question.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 100 1000",
    "Lines, arrows, shapes, texts, labels, numbers, regions, boxes, views and points.",
)
VOCAB_SIZE = 1024


@functools.lru_cache(maxsize=None)
def _build(root: str) -> tuple[str, str]:
    """Trains once and saves (base, functional) tokenizer directories under root."""
    base_dir = os.path.join(root, "tokenizer_base")
    functional_dir = os.path.join(root, "tokenizer_functional")
    tok = tokenizer_lib.build_tokenizer(CORPUS * 8, base_dir, vocab_size=VOCAB_SIZE)
    tokenizer_lib.add_functional_tokens(tok)
    tok.save_pretrained(functional_dir)
    return base_dir, functional_dir


def tokenizer_dir(tmp_dir: str | os.PathLike, functional: bool = True) -> str:
    """Path of a saved tokenizer directory (built on first use under tmp_dir)."""
    base_dir, functional_dir = _build(os.fspath(tmp_dir))
    return functional_dir if functional else base_dir


def make_tokenizer(tmp_dir: str | os.PathLike, functional: bool = True):
    """A fresh PreTrainedTokenizerFast; with the five functional tokens unless functional=False."""
    return tokenizer_lib.load_tokenizer(tokenizer_dir(tmp_dir, functional))


@pytest.fixture(scope="session")
def hf_tokenizer_path(tmp_path_factory) -> str:
    return tokenizer_dir(tmp_path_factory.mktemp("hf_tokenizer"))


@pytest.fixture
def hf_tokenizer(hf_tokenizer_path):
    return tokenizer_lib.load_tokenizer(hf_tokenizer_path)

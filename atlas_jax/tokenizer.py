"""The tokenizer: Qwen2.5-VL-format byte-level BPE, functional tokens, safe and chat encoding.

Three trust levels of text meet here:
  - the chat template's own control tokens (`<|im_start|>`, `<|vision_start|>`, ...), written by us;
  - trusted text (our trajectories, the system prompt), where a functional token string such as
    `<|Line|>` *is* the functional token;
  - untrusted text (a user's question), where every added-token string is plain text, so nobody can
    smuggle an `<|im_end|>` or a `<|Line|>` into the prompt by typing it (`encode_untrusted`).

`encode_chat` assembles the ids of one conversation piece by piece (instead of rendering a string and
tokenising it once) so that each piece is encoded at its own trust level; the result equals the ids of
HF's chat template + processor for text without special strings (tested against transformers).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Sequence

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from atlas_jax.functional_tokens import DEFAULT_TOKENS, QWEN_CONTROL_TOKENS, FunctionalToken, by_name

QWEN_SPECIAL_TOKENS = QWEN_CONTROL_TOKENS  # the control tokens every Qwen2.5-VL tokenizer has
PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"
IMAGE_PAD = "<|image_pad|>"
DEFAULT_SYSTEM = "You are a helpful assistant."

# Qwen2's pre-tokenizer split: contractions, letter runs with one optional leading non-letter, single
# digits, punctuation runs, newline runs, other whitespace.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Renders the Qwen2.5-VL chat format: a default system turn when the first message is not one; string or
# list content, with <|vision_start|><|image_pad|><|vision_end|> per image (and <|video_pad|> per video),
# optional "Picture k: " prefixes (add_vision_id); "<|im_start|>assistant\n" as the generation prompt.
CHAT_TEMPLATE = (
    "{% set seen = namespace(images=0, videos=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "{% set seen.images = seen.images + 1 %}"
    "{% if add_vision_id %}Picture {{ seen.images }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' or 'video' in part %}"
    "{% set seen.videos = seen.videos + 1 %}"
    "{% if add_vision_id %}Video {{ seen.videos }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in part %}"
    "{{ part['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(
    corpus: Iterable[str], out_dir: str | None = None, vocab_size: int = 1024
) -> PreTrainedTokenizerFast:
    """Trains a Qwen2-style byte-level BPE on `corpus` (offline, deterministic) and wraps it as HF's fast tokenizer.

    vocab_size bounds the BPE part (256 byte symbols + merges); the 14 Qwen control tokens follow it, as in
    Qwen2.5-VL. pad = <|endoftext|>, eos = <|im_end|>, chat template = `CHAT_TEMPLATE`. Saved with
    `save_pretrained` when out_dir is given.
    """
    corpus = list(corpus)
    if not corpus:
        raise ValueError("build_tokenizer: the corpus is empty; expected at least one text")
    if vocab_size < 257:
        raise ValueError(f"build_tokenizer: vocab_size={vocab_size} must exceed the 256 byte symbols")
    backend = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    # Added after training so their ids follow the BPE vocabulary, in Qwen's order.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[t for t in QWEN_SPECIAL_TOKENS if t != PAD_TOKEN],
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        model_max_length=131072,  # Qwen2.5-VL's
        padding_side="right",
    )
    tok.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        tok.save_pretrained(out_dir)
    return tok


def load_tokenizer(path: str) -> PreTrainedTokenizerFast:
    """A fast tokenizer from a local directory (ours or a Qwen2.5-VL checkpoint's); never remote code."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"load_tokenizer: {path!r} is not a directory; expected a local tokenizer directory")
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise FileNotFoundError(
            f"load_tokenizer: {os.path.join(path, 'tokenizer.json')!r} is missing; expected a fast (tokenizers) "
            "tokenizer saved with save_pretrained"
        )
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    if not isinstance(tok, PreTrainedTokenizerFast):
        raise TypeError(f"load_tokenizer: {path!r} loaded as {type(tok).__name__}; expected a fast tokenizer")
    return tok


def add_functional_tokens(
    tok: PreTrainedTokenizerFast, tokens: Sequence[FunctionalToken] = DEFAULT_TOKENS
) -> tuple[int, ...]:
    """Adds the functional tokens that are missing (idempotent); returns their ids in registry order.

    They are added as *special* added tokens: each encodes as one id in trusted text, and the
    split-special-tokens path (`encode_untrusted`) turns their strings into plain text. Decoding keeps them
    unless skip_special_tokens=True. A tokenizer that already holds a functional string any other
    way (a plain vocabulary entry or a non-special added token) is refused: untrusted text could
    then encode to the functional id.
    """
    added = tok.added_tokens_decoder
    for t in tokens:
        token_id = tok.backend_tokenizer.token_to_id(t.token)
        if token_id is not None and not (token_id in added and added[token_id].special):
            raise ValueError(
                f"the tokenizer holds functional token {t.token!r} ({t.name}) as an ordinary vocabulary entry "
                f"(id {token_id}), so untrusted text could encode to it; start from a tokenizer without it "
                "(e.g. the base Qwen2.5-VL tokenizer)"
            )
    missing = [t.token for t in tokens if tok.backend_tokenizer.token_to_id(t.token) is None]
    if missing:
        tok.add_tokens([AddedToken(s, special=True, normalized=False) for s in missing], special_tokens=True)
    return functional_token_ids(tok, tokens)


def functional_token_ids(
    tok: PreTrainedTokenizerFast, tokens: Sequence[FunctionalToken] = DEFAULT_TOKENS
) -> tuple[int, ...]:
    """The ids of `tokens` in registry order; an error names any token that is absent or not a single id."""
    ids = []
    for t in tokens:
        token_id = tok.backend_tokenizer.token_to_id(t.token)
        if token_id is None:
            raise KeyError(
                f"functional token {t.token!r} ({t.name}) is not in the tokenizer's vocabulary; "
                "call add_functional_tokens(tok) first"
            )
        encoded = tok.encode(t.token, add_special_tokens=False, split_special_tokens=False)
        if encoded != [token_id]:
            raise ValueError(
                f"functional token {t.token!r} ({t.name}) encodes as {encoded}, expected the single id {token_id}; "
                "it must be an added special token"
            )
        ids.append(token_id)
    return tuple(ids)


@dataclasses.dataclass(frozen=True)
class RunTokens:
    """The token ids a run needs everywhere (pipeline, model config, sampler, rewards, evaluation),
    derived once from its tokenizer by `RunTokens.of` and passed around, never re-derived.

    functional: (name, id) of each configured functional token, in config order.
    stop_ids: the ids that end a completion (`<|im_end|>`, `<|endoftext|>`; those the tokenizer has).
    pad_id: the padding id. image_id / video_id / vision_start_id / vision_end_id: the chat
    template's image placeholders, which the model config must agree with.
    """

    functional: tuple[tuple[str, int], ...]
    stop_ids: tuple[int, ...]
    pad_id: int
    image_id: int
    video_id: int
    vision_start_id: int
    vision_end_id: int

    @classmethod
    def of(cls, tok: PreTrainedTokenizerFast, names: Sequence[str] | None = None) -> RunTokens:
        """The record for `tok` (which must already hold the functional tokens `names`)."""
        tokens = by_name(tuple(names) if names is not None else None)
        stop = tuple(i for i in (tok.convert_tokens_to_ids(t) for t in (EOS_TOKEN, PAD_TOKEN)) if i is not None)
        special = {}
        for field, token in (("image_id", IMAGE_PAD), ("video_id", "<|video_pad|>"),
                             ("vision_start_id", "<|vision_start|>"), ("vision_end_id", "<|vision_end|>")):
            special[field] = tok.backend_tokenizer.token_to_id(token)
            if special[field] is None:
                raise KeyError(f"the tokenizer has no {token!r} (expected a Qwen2.5-VL-format tokenizer)")
        return cls(
            functional=tuple(zip((t.name for t in tokens), functional_token_ids(tok, tokens))),
            stop_ids=stop, pad_id=tok.pad_token_id or 0, **special,
        )

    @property
    def functional_ids(self) -> tuple[int, ...]:
        return tuple(i for _, i in self.functional)

    @property
    def functional_names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.functional)

    @property
    def functional_strings(self) -> tuple[str, ...]:
        """The functional tokens as text (`<|Line|>`, ...), in config order."""
        return tuple(t.token for t in by_name(self.functional_names))


def encode_untrusted(tok: PreTrainedTokenizerFast, text: str) -> list[int]:
    """Ids of `text` with every added-token string (control or functional) encoded as plain text.

    Equivalent to HF's `split_special_tokens=True` for special added tokens, but runs the backend's
    normalizer -> pre-tokenizer -> BPE model itself: HF implements that flag by mutating shared tokenizer
    state per call, which another thread could flip between setting it and encoding.
    """
    backend = tok.backend_tokenizer
    if backend.normalizer is not None:
        text = backend.normalizer.normalize_str(text)
    pieces = [text] if backend.pre_tokenizer is None else [p for p, _ in backend.pre_tokenizer.pre_tokenize_str(text)]
    ids = [t.id for piece in pieces for t in backend.model.tokenize(piece)]
    # A vocabulary that holds an added token's string as an ordinary BPE entry could still produce it.
    forbidden = set(tok.added_tokens_decoder).intersection(ids)
    if forbidden:
        names = [tok.added_tokens_decoder[i].content for i in sorted(forbidden)]
        raise ValueError(f"encode_untrusted: plain text {text[:80]!r} produced the control tokens {names}")
    return ids


def encode_trusted(tok: PreTrainedTokenizerFast, text: str) -> list[int]:
    """Ids of our own text (trajectories, system prompt): added-token strings become their tokens."""
    return tok.encode(text, add_special_tokens=False, split_special_tokens=False) if text else []


# Tokens that would break the conversation's structure or its image alignment if trusted text held them.
_STRUCTURE_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    IMAGE_PAD, "<|video_pad|>",
)


def _checked_trusted(tok: PreTrainedTokenizerFast, text: str, field: str) -> list[int]:
    """encode_trusted, refusing structure tokens: a stray <|im_end|> would end the turn early and a stray
    <|image_pad|> would take an image feature, both silently."""
    ids = encode_trusted(tok, text)
    for name in _STRUCTURE_TOKENS:
        if tok.convert_tokens_to_ids(name) in ids:
            raise ValueError(
                f"encode_chat: the {field} holds the control token {name!r}; expected plain text and functional tokens"
            )
    return ids


@dataclasses.dataclass
class EncodedChat:
    """One conversation as ids. T = prompt + response tokens.

    input_ids: int32[T].
    loss_mask: bool[T], True on the response and its closing <|im_end|> (not the "\\n" after it).
    functional_mask: bool[T], True where input_ids holds a functional token id.
    prompt_len: tokens up to and including "<|im_start|>assistant\\n".
    """

    input_ids: np.ndarray
    loss_mask: np.ndarray
    functional_mask: np.ndarray
    prompt_len: int


def encode_chat(
    tok: PreTrainedTokenizerFast,
    question: str,
    image_token_counts: Sequence[int],
    response: str | None = None,
    *,
    functional_ids: Sequence[int] = (),
    system: str | None = DEFAULT_SYSTEM,
) -> EncodedChat:
    """Encodes system / user (images first, then the question) / assistant turns in the Qwen2.5-VL format.

    image_token_counts: merged image tokens per image (grid_t * grid_h * grid_w / merge_size**2); each image
    becomes <|vision_start|> + <|image_pad|> * count + <|vision_end|>.
    question: untrusted (`encode_untrusted`). response: trusted, may hold functional tokens; None gives the
    generation prompt only. system: trusted; None drops the system turn (HF's template would insert the
    default one instead).

    The response is encoded apart from the "assistant\\n" header, as generation sees it. Tokenising the
    rendered string in one go (HF) differs only if the response starts with whitespace ending in a newline,
    which the pre-tokenizer would merge with the header's "\\n".
    """
    names = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", IMAGE_PAD)
    special = {s: tok.convert_tokens_to_ids(s) for s in names}
    for s, i in special.items():
        if i is None or i == tok.unk_token_id:
            raise KeyError(f"encode_chat: control token {s!r} is not in the tokenizer; expected a Qwen2.5-VL tokenizer")
    im_start, im_end = special["<|im_start|>"], special["<|im_end|>"]
    newline = encode_trusted(tok, "\n")

    ids: list[int] = []
    if system is not None:
        ids += [im_start, *_checked_trusted(tok, "system\n" + system, "system"), im_end, *newline]
    ids.append(im_start)
    if len(image_token_counts) > 0:  # may be a numpy array
        ids += encode_trusted(tok, "user\n")
        for k, count in enumerate(image_token_counts):
            if int(count) <= 0:
                raise ValueError(f"encode_chat: image_token_counts[{k}]={count}; expected a positive token count")
            ids += [special["<|vision_start|>"], *[special[IMAGE_PAD]] * int(count), special["<|vision_end|>"]]
        ids += encode_untrusted(tok, question)
    else:
        # Header and question form one pre-tokenizer span in the rendered text, so encode them together.
        ids += encode_untrusted(tok, "user\n" + question)
    ids += [im_end, *newline, im_start, *encode_trusted(tok, "assistant\n")]
    prompt_len = len(ids)
    if response is not None:
        ids += [*_checked_trusted(tok, response, "response"), im_end]
        response_end = len(ids)
        ids += newline
    else:
        response_end = prompt_len

    input_ids = np.asarray(ids, dtype=np.int32)
    loss_mask = np.zeros(len(ids), dtype=bool)
    loss_mask[prompt_len:response_end] = True
    functional_mask = np.isin(input_ids, np.asarray(list(functional_ids), dtype=np.int32))
    return EncodedChat(input_ids, loss_mask, functional_mask, prompt_len)

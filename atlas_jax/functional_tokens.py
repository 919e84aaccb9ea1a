"""The functional tokens: one vocabulary word per visual operation.

A trajectory states its intent, emits the token, then reasons as if the edited image existed:
"I draw the height from A to BC <|Line|> ... so the area is ...". Each token is also tied to a
learned visual-operation module (`model/visual_ops.py`) unless the model runs in 'vocab' mode.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class FunctionalToken:
    """token: the literal string in the Qwen special-token style; words: describe the operation,
    and their mean embedding initialises the token's new vocabulary row."""

    name: str
    token: str
    words: tuple[str, ...]


# Qwen2.5-VL's control tokens, in its id order (they follow the BPE vocabulary there, and in the
# tokenizers this project trains).
QWEN_CONTROL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Every added token of the released Qwen2.5-VL tokenizer (ids 151643-151664): a stock Qwen
# tokenizer matches any of them inside text as one id, so none may appear in untrusted text.
QWEN_ADDED_TOKENS: tuple[str, ...] = QWEN_CONTROL_TOKENS + (
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)

DEFAULT_TOKENS: tuple[FunctionalToken, ...] = (
    FunctionalToken("manip", "<|Manip|>", ("zoom", "crop", "rotate", "view")),
    FunctionalToken("line", "<|Line|>", ("line", "draw", "segment")),
    FunctionalToken("arrow", "<|Arrow|>", ("arrow", "direction", "point")),
    FunctionalToken("shape", "<|Shape|>", ("shape", "outline", "region", "box")),
    FunctionalToken("text", "<|Text|>", ("text", "label", "number", "write")),
)


def by_name(names: list[str] | tuple[str, ...] | None = None) -> tuple[FunctionalToken, ...]:
    """The configured subset of the registry, in the order given (default: all five)."""
    if names is None:
        return DEFAULT_TOKENS
    table = {t.name: t for t in DEFAULT_TOKENS}
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"functional tokens {unknown} are unknown; expected names from {sorted(table)}")
    return tuple(table[n] for n in names)


def token_strings(tokens: tuple[FunctionalToken, ...] = DEFAULT_TOKENS) -> tuple[str, ...]:
    return tuple(t.token for t in tokens)

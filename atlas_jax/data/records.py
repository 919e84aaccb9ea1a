"""The stored form of a Sample (a plain dict of encoded bytes and strings) and its validation.

A *record* is what the TFDS/ArrayRecord datasets and the JSONL import hold:

    images:               list[bytes]  encoded images (PNG for the synthetic suite, the user's
                                       original file bytes for imported data), in order
    question, response, answer, task, response_answer_only, uid:   str
    origin:               str, optional: 'FILE:LINE' the record was imported from (JSONL only;
                                       the synthetic suite has none). Kept apart from the
                                       user-settable uid so errors can always name the line.
    ops:                  list[str], optional: the functional operations the question calls for
                                       (JSONL only), by `functional_tokens` name ('line', ...)
    target_box:           list[int], optional: [x0, y0, x1, y1] (ends exclusive), the pixels of the
                                       first image holding the object the functional token acts
                                       on (the cell-scene families, generated on the fly; stored
                                       sets hold none), for evaluation's localisation metric

Every record is validated when it is decoded, so a bad one is rejected with a `BadRecordError`
naming the source (file or dataset split), the record and the field, never turned into a silent
wrong batch. Rules (`validate_sample`):

- all text fields are `str` that UTF-8 can encode (no lone surrogates); `question`, `response` and
  `answer` are non-empty;
- `images` is a list of images that open AND fully decode (`Image.open` + `verify()` + `load()`,
  with `PIL.ImageFile.LOAD_TRUNCATED_IMAGES` left False, so a truncated PNG/JPEG raises instead of
  decoding partially); at least `min_images` of them (default 1: every question is about an image;
  pass `min_images=0` for text-only data) and at most `max_images` when given;
- the question is untrusted text: it may not contain any functional-token string, any Qwen2.5-VL
  control token (`QWEN_SPECIAL_TOKENS`), nor anything shaped like one (`<|...|>`), because a
  tokenizer would turn such text into control ids;
- the response may contain the configured functional tokens but no other control token and no
  unknown `<|...|>` token (a misspelt functional token would silently become sub-word pieces);
- the response ends its reasoning in `\\boxed{...}`; the content of the last complete box (read
  exactly as the reward reads it, `boxed_content`), stripped of surrounding whitespace, must equal
  the stripped `answer` (an error by default; `answer_mismatch="warn"` logs a warning instead, for
  user data whose answers are graded by another rule, e.g. '0.5' vs '1/2');
- `response_answer_only`, when non-empty, follows the same rules as the response but may not
  contain functional tokens (it is the baseline trajectory without them);
- `ops`, when given, is a list of functional-token names (`functional_tokens.DEFAULT_TOKENS`, case
  ignored on reading: 'Line' is 'line'), each one of the configured functional tokens.

Over-long samples are checked later, by the input pipeline, once the text is tokenised.
"""

from __future__ import annotations

import io
import logging
import os
import re
from collections.abc import Mapping, Sequence

from PIL import Image, ImageFile

from atlas_jax.data.sample import BadRecordError, Sample
from atlas_jax.functional_tokens import DEFAULT_TOKENS, QWEN_ADDED_TOKENS, token_strings
from atlas_jax.rl.rewards import extract_boxed as boxed_content  # the reward's reading, so a valid record is graded alike

QWEN_SPECIAL_TOKENS = QWEN_ADDED_TOKENS

TEXT_FIELDS: tuple[str, ...] = ("question", "response", "answer", "task", "response_answer_only", "uid")
# The other text fields may be omitted and default to '' (user data has no task or answer-only variant).
REQUIRED_FIELDS: tuple[str, ...] = ("images", "question", "response", "answer")
# Only imported records carry it; stored only by the user-data builder.
ORIGIN_FIELD = "origin"
# Optional in JSONL; stored only by the user-data builder (the synthetic suite's tasks name their ops).
OPS_FIELD = "ops"
# Optional; only the synthetic families that know which object their functional token acts on set it.
TARGET_BOX_FIELD = "target_box"

# Anything in the Qwen special-token style, known or not.
_TOKEN_SHAPED = re.compile(r"<\|[^<>|\s]{1,64}\|>")

log = logging.getLogger(__name__)


def encode_sample(sample: Sample, image_format: str = "PNG") -> dict:
    """The record for `sample`: images encoded losslessly as `image_format` (PNG by default)."""
    images = []
    for image in sample.images:
        buffer = io.BytesIO()
        image.save(buffer, format=image_format)
        images.append(buffer.getvalue())
    record = {
        "images": images,
        "question": sample.question,
        "response": sample.response,
        "answer": sample.answer,
        "task": sample.task,
        "response_answer_only": sample.response_answer_only,
        "uid": sample.uid,
    }
    if sample.origin:
        record[ORIGIN_FIELD] = sample.origin
    if sample.ops:
        record[OPS_FIELD] = list(sample.ops)
    if sample.target_box:
        record[TARGET_BOX_FIELD] = [int(v) for v in sample.target_box]
    return record


def parse_target_box(value, bad) -> tuple[int, ...]:
    """A record's `target_box` value as (x0, y0, x1, y1): four integers with x0 < x1 and y0 < y1;
    anything else raises `bad(field, problem)`."""
    ok = (isinstance(value, (list, tuple)) and len(value) == 4
          and all(isinstance(v, int) and not isinstance(v, bool) for v in value))
    if not ok or not (value[0] < value[2] and value[1] < value[3]):
        raise bad(TARGET_BOX_FIELD, f"expected [x0, y0, x1, y1], four integer pixel coordinates with x0 < x1 and "
                                    f"y0 < y1; got {value!r}")
    return tuple(value)


def parse_ops(value, bad) -> tuple[str, ...]:
    """The functional-token names of a record's `ops` value (a list of names, case ignored), in the
    registry's spelling; anything else raises `bad(field, problem)`."""
    known = {t.name.lower(): t.name for t in DEFAULT_TOKENS}
    if not isinstance(value, (list, tuple)):
        raise bad(OPS_FIELD, f"wrong type: expected a list of functional-token names from {sorted(known)}, got {type(value).__name__}")
    names = []
    for i, name in enumerate(value):
        if not isinstance(name, str) or name.lower() not in known:
            raise bad(f"{OPS_FIELD}[{i}]", f"unknown operation: {name!r}; expected functional-token names from {sorted(known)}")
        names.append(known[name.lower()])
    return tuple(names)


def record_location(source: str, index: int | str, origin: str = "", uid: str = "") -> tuple[str, str]:
    """(source, record) for a BadRecordError about a stored record: the original file and line
    when `origin` is 'FILE:LINE', else `source` and `index`; the uid and the stored position are
    added when they say something more, e.g.
    ('/data/train.jsonl', "line 7 (uid 'q-17'; stored as atlas_user_data/mine:train record 3)")."""
    file, sep, line = origin.rpartition(":")
    if sep and file and line.isdigit():
        # The import's default uid ('<file name>:<line>') would only repeat the line.
        extra = [f"uid {uid!r}"] if uid and uid != f"{os.path.basename(file)}:{line}" else []
        extra.append(f"stored as {source} record {index}")
        return file, f"line {line} ({'; '.join(extra)})"
    return source, f"{index} (uid {uid!r})" if uid else str(index)


def decode_image(data: bytes, source: str, index: int | str, field: str = "images") -> Image.Image:
    """A fully decoded PIL image from encoded bytes; unreadable or truncated data raises.

    `verify()` catches truncated or corrupt PNG chunks (CRC, missing data) that `load()` may
    accept; `load()` catches truncated JPEG scans. `verify()` leaves the image unusable, hence the
    second open.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Someone turned on partial decoding process-wide; refuse rather than pass grey pixels on.
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True; truncated images would decode silently")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BadRecordError(source, index, field, f"wrong type: expected encoded image bytes, got {type(data).__name__}")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            probe.verify()
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise BadRecordError(source, index, field, f"unreadable or truncated image: {type(e).__name__}: {e}") from e
    return image


def decode_record(record: Mapping, source: str, index: int | str, **rules) -> Sample:
    """The validated Sample stored in `record`.

    source: where the record came from (a file, 'atlas_synthetic/tiny:train'), for messages.
    index: the record's position or line number there. rules: `validate_sample`'s keywords.
    Raises BadRecordError naming source, record and field when anything is wrong.
    """
    if not isinstance(record, Mapping):
        raise BadRecordError(source, index, "<record>", f"wrong type: expected a mapping of fields, got {type(record).__name__}")
    for field in REQUIRED_FIELDS:
        if field not in record:
            raise BadRecordError(source, index, field, "missing field: required")
    for field in TEXT_FIELDS:
        value = record.get(field, "")
        if not isinstance(value, str):
            raise BadRecordError(source, index, field, f"wrong type: expected a string, got {type(value).__name__}")
    origin = record.get(ORIGIN_FIELD, "")
    if not isinstance(origin, str):
        raise BadRecordError(source, index, ORIGIN_FIELD, f"wrong type: expected a string, got {type(origin).__name__}")
    raw_images = record["images"]
    if not isinstance(raw_images, (list, tuple)):
        raise BadRecordError(source, index, "images", f"wrong type: expected a list of encoded images, got {type(raw_images).__name__}")
    ops = parse_ops(record.get(OPS_FIELD, ()), lambda field, problem: BadRecordError(source, index, field, problem))
    target_box = record.get(TARGET_BOX_FIELD)
    if target_box is not None:
        target_box = parse_target_box(target_box, lambda field, problem: BadRecordError(source, index, field, problem))
    images = [decode_image(data, source, index, f"images[{i}]") for i, data in enumerate(raw_images)]
    sample = Sample(
        images=images,
        question=record["question"],
        response=record["response"],
        answer=record["answer"],
        task=record.get("task", ""),
        response_answer_only=record.get("response_answer_only", ""),
        uid=record.get("uid", ""),
        origin=origin,
        ops=ops,
        target_box=target_box or (),
    )
    validate_sample(sample, source, index, **rules)
    return sample


def validate_sample(
    sample: Sample,
    source: str,
    index: int | str,
    *,
    functional_strings: Sequence[str] | None = None,
    min_images: int = 1,
    max_images: int | None = None,
    answer_mismatch: str = "error",
) -> None:
    """Raise BadRecordError if `sample` breaks a rule listed in this module's docstring.

    functional_strings: the functional tokens allowed in responses (default: the five of
    `atlas_jax.functional_tokens`). answer_mismatch: 'error' | 'warn'.
    """
    if answer_mismatch not in ("error", "warn"):
        raise ValueError(f"answer_mismatch must be 'error' or 'warn', got {answer_mismatch!r}")
    functional = tuple(token_strings() if functional_strings is None else functional_strings)

    def bad(field: str, problem: str) -> BadRecordError:
        return BadRecordError(source, index, field, problem)

    for field in TEXT_FIELDS:
        value = getattr(sample, field)
        if not isinstance(value, str):
            raise bad(field, f"wrong type: expected a string, got {type(value).__name__}")
        try:  # JSON can spell a lone surrogate ("\ud800"), which no UTF-8 writer or tokenizer accepts
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise bad(field, f"invalid text: {e.reason} (character {e.start}, {value[e.start]!r})") from e
    for field in ("question", "response", "answer"):
        if not getattr(sample, field).strip():
            raise bad(field, "empty: a non-blank string is required")

    if not isinstance(sample.images, list):
        raise bad("images", f"wrong type: expected a list of images, got {type(sample.images).__name__}")
    for i, image in enumerate(sample.images):
        if not isinstance(image, Image.Image):
            raise bad(f"images[{i}]", f"wrong type: expected a PIL image, got {type(image).__name__}")
    if len(sample.images) < min_images:
        raise bad("images", f"too few images: {len(sample.images)}, at least {min_images} required")
    if max_images is not None and len(sample.images) > max_images:
        raise bad("images", f"too many images: {len(sample.images)}, at most {max_images} allowed")

    if not isinstance(sample.ops, tuple):
        raise bad(OPS_FIELD, f"wrong type: expected a tuple of functional-token names, got {type(sample.ops).__name__}")
    # An op the run has no token for could never be rewarded: the record and the config disagree.
    configured = [t.name for t in DEFAULT_TOKENS if t.token in functional]
    for i, name in enumerate(sample.ops):
        if name not in configured:
            raise bad(f"{OPS_FIELD}[{i}]", f"unknown operation: {name!r}; expected one of the configured functional tokens {configured}")

    found = _control_strings(sample.question, known=functional, allowed=())
    if found:
        raise bad("question", f"control tokens: {found} found; questions are untrusted text and may contain none")

    trajectories = [("response", functional)]
    if sample.response_answer_only:
        trajectories.append(("response_answer_only", ()))
    for field, allowed in trajectories:
        text = getattr(sample, field)
        found = _control_strings(text, known=functional, allowed=allowed)
        if found:
            what = f"only the functional tokens {list(allowed)} may appear" if allowed else "none may appear"
            raise bad(field, f"control tokens: {found} found; {what}")
        boxed = boxed_content(text)
        if boxed is None:
            raise bad(field, "no boxed answer: a closed \\boxed{...} with the final answer is required")
        if boxed.strip() != sample.answer.strip():
            problem = f"answer mismatch: boxed {boxed.strip()!r}, field 'answer' {sample.answer.strip()!r}"
            if answer_mismatch == "error":
                raise bad(field, problem)
            log.warning("%s", bad(field, problem))


def _control_strings(text: str, known: Sequence[str], allowed: Sequence[str]) -> list[str]:
    """Control-token strings in `text` other than `allowed`, in order of first appearance: the
    Qwen specials, the `known` functional tokens, and anything else `<|...|>`-shaped."""
    hits = {}
    for token in (*QWEN_SPECIAL_TOKENS, *known):
        pos = text.find(token)
        if pos >= 0 and token not in allowed:
            hits.setdefault(token, pos)
    for match in _TOKEN_SHAPED.finditer(text):
        if match.group() not in allowed:
            hits.setdefault(match.group(), match.start())
    return sorted(hits, key=hits.get)

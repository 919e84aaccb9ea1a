"""One record -> one model-ready example, and examples -> one fixed-shape host batch.

`ExampleBuilder` turns a record (a `Sample`, or a stored record dict) into numpy arrays: HF-exact
image preprocessing, the chat encoding with loss and functional-token masks, M-RoPE positions and
the vision tower's index tables. Anything that does not fit the configured shapes is a
`BadRecordError` naming the record (its JSONL file and line when it was imported, see
`records.record_location`) and the field at fault (for an over-long sample: `question` when the
prompt alone is longer than max_length, `images` when it is even without the question's text,
else the response). `collate` pads a list of examples into the batch layout the SFT / RL steps
read (shapes below, B = per-host batch, T = length bucket, P = max_patches,
D = 3 * 2 * 14 * 14 = 1176, N = max_images, U = P / 4):

  input_ids         int32[B, T]     pad id after the sequence (SFT) or before it (RL)
  attention_mask    bool[B, T]
  positions         int32[B, 3, T]  M-RoPE (temporal, height, width); 0 on padding
  loss_mask         bool[B, T]      SFT only: response tokens and their closing <|im_end|>
  functional_mask   bool[B, T]      SFT only: functional-token positions
  pixel_values      float32[B, P, D]  each sample's patches in processor order, then zeros
  window_index      int32[B, U]     \
  rope_hw           int32[B, P, 2]   |  `model.vision_layout.vision_layout` of each sample
  full_segments     int32[B, P]      |
  window_segments   int32[B, P]      |
  unit_valid        bool[B, U]      /
  grid_thw          int32[B, N, 3]  zeros for absent images
  num_images        int32[B]
  prompt_len        int32[B]        tokens up to and including "<|im_start|>assistant\\n"
  answer, task, uid list[str]       host-side metadata (never sent to devices)
  ops               list[tuple[str, ...]]  host-side: the functional ops each record calls for (`Sample.ops`)
  skipped           int             bad records skipped while this batch was assembled
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Mapping, Sequence

import numpy as np

from atlas_jax import tokenizer as tokenizer_lib
from atlas_jax.data import image_processing as improc
from atlas_jax.data.sample import BadRecordError, Sample
from atlas_jax.model import rope, vision_layout
from atlas_jax.model.config import ModelConfig

META_KEYS = ("answer", "task", "uid", "ops")
LAYOUT_KEYS = ("window_index", "rope_hw", "full_segments", "window_segments", "unit_valid")


def answer_only_target(sample: Sample, share: float) -> bool:
    """Whether SFT trains this record on its answer-only response, for `share` of the records
    (data.sft_target: 'trajectory' 0, 'answer_only' 1, 'mixed' data.answer_only_share): a uniform
    draw in [0, 1) from a hash of its uid (its question and response when it has none) below
    `share`. A function of the record alone, so hosts, worker processes, epochs and resumed runs
    agree without shared state."""
    if share <= 0.0 or share >= 1.0:
        return share >= 1.0
    key = sample.uid or f"{sample.question}\x00{sample.response}"
    draw = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") / 2**64
    return draw < share


@dataclasses.dataclass(frozen=True)
class BadExample:
    """Stands in for a record that failed, so skip mode can count it downstream."""

    error: str


class ExampleBuilder:
    """Builds one example per record; picklable (it may run in Grain worker processes).

    fmt: 'sft' (prompt + target trajectory) or 'rl' (prompt only, with answer metadata).
    answer_only_share: the share of SFT records trained on their answer-only response (the
      baseline) instead of their trajectory: 0 none, 1 all, between: per record (`answer_only_target`).
    """

    def __init__(
        self,
        tok,
        model_cfg: ModelConfig,
        image_cfg: improc.ImageProcessorConfig,
        *,
        source_name: str,
        fmt: str,
        max_length: int,
        max_patches: int,
        max_images: int,
        min_images: int,
        functional_ids: Sequence[int],
        functional_strings: Sequence[str],
        answer_mismatch: str = "error",
        answer_only_share: float = 0.0,
    ):
        self.tok, self.model_cfg, self.image_cfg = tok, model_cfg, image_cfg
        self.source_name, self.fmt = source_name, fmt
        self.max_length, self.max_patches, self.max_images, self.min_images = max_length, max_patches, max_images, min_images
        self.functional_ids, self.functional_strings = tuple(functional_ids), tuple(functional_strings)
        self.answer_mismatch = answer_mismatch
        self.answer_only_share = answer_only_share

    def __call__(self, indexed_record: tuple[int, object]) -> dict:
        index, record = indexed_record
        sample = self.decode(index, record)
        return self.build(index, sample)

    def decode(self, index: int, record) -> Sample:
        # Imported here: records.py imports the tokenizer module, which is heavy for worker start-up.
        from atlas_jax.data import records

        kw = dict(
            functional_strings=self.functional_strings,
            min_images=self.min_images,
            max_images=self.max_images,
            answer_mismatch=self.answer_mismatch,
        )
        if isinstance(record, Sample):
            records.validate_sample(record, *self.location(index, record.origin, record.uid), **kw)
            return record
        if isinstance(record, Mapping):
            origin, uid = record.get(records.ORIGIN_FIELD, ""), record.get("uid", "")
            if not isinstance(origin, str) or not isinstance(uid, str):
                origin, uid = "", ""  # decode_record names the bad field
            return records.decode_record(record, *self.location(index, origin, uid), **kw)
        raise BadRecordError(
            self.source_name, index, "<record>", f"wrong type: expected a Sample or a record dict, got {type(record).__name__}"
        )

    def location(self, index: int, origin: str = "", uid: str = "") -> tuple[str, str]:
        """(source, record) naming record `index` in errors: its JSONL file and line when known."""
        from atlas_jax.data import records

        return records.record_location(self.source_name, index, origin, uid)

    def build(self, index: int, sample: Sample) -> dict:
        source, name = self.location(index, sample.origin, sample.uid)

        def bad(field: str, problem: str) -> BadRecordError:
            return BadRecordError(source, name, field, problem)

        if len(sample.images) > self.max_images:
            raise bad("images", f"too many images: {len(sample.images)}, at most max_images={self.max_images}")
        pixels, grids = [], []
        for k, img in enumerate(sample.images):
            try:
                pv, grid = improc.preprocess_image(img, self.image_cfg)
            except improc.ImageError as e:
                raise bad(f"images[{k}]", str(e)) from None
            pixels.append(pv)
            grids.append(grid)
        n_patches = sum(p.shape[0] for p in pixels)
        if n_patches > self.max_patches:
            raise bad(
                "images",
                f"too many patches: {n_patches} (grids {grids}) > max_patches={self.max_patches}; "
                "raise max_patches or lower image max_pixels",
            )
        merge = self.image_cfg.merge_size
        counts = [improc.num_image_tokens(g, merge) for g in grids]

        if self.fmt == "sft":
            field = "response_answer_only" if answer_only_target(sample, self.answer_only_share) else "response"
            response = getattr(sample, field)
            if not response.strip():
                raise bad(field, "empty: SFT trains on this field here (data.sft_target)")
        else:
            field, response = "question", None
        chat = tokenizer_lib.encode_chat(
            self.tok, sample.question, counts, response, functional_ids=self.functional_ids
        )
        length, prompt_len = int(chat.input_ids.shape[0]), int(chat.prompt_len)
        if length > self.max_length:
            raise self._too_long(bad, sample, field, length, prompt_len, sum(counts))
        positions = rope.mrope_positions(
            chat.input_ids,
            grids,
            None,
            image_token_id=self.model_cfg.image_token_id,
            spatial_merge_size=self.model_cfg.vision.spatial_merge_size,
        )
        layout = vision_layout.vision_layout(grids, self.model_cfg.vision, self.max_patches)
        d = self.image_cfg.patch_dim
        return {
            "input_ids": chat.input_ids,
            "loss_mask": chat.loss_mask,
            "functional_mask": chat.functional_mask,
            "positions": positions,
            "prompt_len": chat.prompt_len,
            "pixel_values": np.concatenate(pixels) if pixels else np.zeros((0, d), np.float32),
            "grid_thw": np.asarray(grids, np.int32).reshape(-1, 3),
            **layout,
            "answer": sample.answer,
            "task": sample.task,
            "uid": sample.uid or f"{self.source_name}:{index}",
            "ops": sample.ops,
        }

    def _too_long(self, bad, sample: Sample, response_field: str, length: int, prompt_len: int, image_tokens: int):
        """The error for a sample over max_length, blaming the part that overflows: the images, the
        question (the prompt alone is too long), or the response (the prompt fits, the whole does not)."""
        limit = self.max_length
        if prompt_len <= limit:
            return bad(
                response_field,
                f"too long: {length} tokens = prompt {prompt_len} + response {length - prompt_len} > max_length={limit}; "
                f"after this prompt the response may have at most {limit - prompt_len} tokens",
            )
        question_tokens = len(tokenizer_lib.encode_untrusted(self.tok, sample.question))
        parts = f"question {question_tokens}, images {image_tokens}, chat template {prompt_len - question_tokens - image_tokens}"
        if prompt_len - question_tokens > limit:  # even an empty question would not fit
            return bad("images", f"too long: the prompt is {prompt_len} tokens ({parts}) > max_length={limit} "
                                 "without the question's text; lower image max_pixels or raise max_length")
        return bad("question", f"too long: the prompt alone is {prompt_len} tokens ({parts}) > max_length={limit}; "
                               f"the question may have at most {limit - (prompt_len - question_tokens)} tokens")


def bucket_length(longest: int, max_length: int, pad_to_multiple: int) -> int:
    """The padded length of a batch: `longest` rounded up to a multiple (a few shapes only), capped."""
    if pad_to_multiple <= 0:
        return max_length
    return min(max_length, math.ceil(max(longest, 1) / pad_to_multiple) * pad_to_multiple)


def collate(
    examples: Sequence[dict],
    *,
    fmt: str,
    pad_id: int,
    max_length: int,
    pad_to_multiple: int,
    max_patches: int,
    max_images: int,
    patch_dim: int,
) -> dict:
    """Pads `examples` into one host batch (layout in the module docstring)."""
    b = len(examples)
    lengths = [int(ex["input_ids"].shape[0]) for ex in examples]
    t = bucket_length(max(lengths), max_length, pad_to_multiple)
    left = fmt == "rl"
    input_ids = np.full((b, t), pad_id, np.int32)
    attention_mask = np.zeros((b, t), bool)
    positions = np.zeros((b, 3, t), np.int32)
    loss_mask = np.zeros((b, t), bool)
    functional_mask = np.zeros((b, t), bool)
    pixel_values = np.zeros((b, max_patches, patch_dim), np.float32)
    grid_thw = np.zeros((b, max_images, 3), np.int32)
    num_images = np.zeros((b,), np.int32)
    for i, (ex, n) in enumerate(zip(examples, lengths)):
        sl = slice(t - n, t) if left else slice(0, n)
        input_ids[i, sl] = ex["input_ids"]
        attention_mask[i, sl] = True
        positions[i, :, sl] = ex["positions"]
        loss_mask[i, sl] = ex["loss_mask"]
        functional_mask[i, sl] = ex["functional_mask"]
        pv = ex["pixel_values"]
        pixel_values[i, : pv.shape[0]] = pv
        g = ex["grid_thw"]
        grid_thw[i, : g.shape[0]] = g
        num_images[i] = g.shape[0]
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "positions": positions,
        "pixel_values": pixel_values,
        "grid_thw": grid_thw,
        "num_images": num_images,
        "prompt_len": np.asarray([ex["prompt_len"] for ex in examples], np.int32),
    }
    if fmt == "sft":
        batch["loss_mask"] = loss_mask
        batch["functional_mask"] = functional_mask
    for key in LAYOUT_KEYS:
        batch[key] = np.stack([ex[key] for ex in examples])
    for key in META_KEYS:
        batch[key] = [ex[key] for ex in examples]
    batch["skipped"] = int(sum(ex.get("skipped", 0) for ex in examples))
    return batch

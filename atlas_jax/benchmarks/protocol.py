"""The authors' evaluation protocol for the paper's benchmarks, as one config record.

ATLAS (arXiv 2605.15198) evaluates with greedy decoding, up to 8192 new tokens, images resized
into [401,408, 4,014,080] pixels (512 and 5120 merged 28x28 windows) and every question followed
by `PROMPT_SUFFIX`. The config section `benchmark` maps 1:1 onto `BenchmarkConfig`, whose
defaults are that protocol; tests and quick checks override them small.
"""

from __future__ import annotations

import dataclasses
import re

PROMPT_SUFFIX = "Please think step by step, and put your final answer within \\boxed{}."
# The BLINK subsets the paper reports (its table's column order), as the release names them.
PAPER_BLINK_SUBSETS = (
    "Art_Style", "Counting", "Forensic_Detection", "IQ_Test", "Jigsaw", "Multi-view_Reasoning", "Spatial_Relation",
)
_JUDGE_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


@dataclasses.dataclass(frozen=True)
class BenchmarkConfig:
    """Which benchmark files to evaluate on, and how (defaults: the authors' protocol).

    vstar: V* Bench, the release's directory (holding `test_questions.jsonl`) or that file.
    wemath: WeMath testmini, `testmini.json` (images relative to its directory) or the
      release's parquet file (images embedded).
    blink: BLINK, the release's directory (one folder per subset holding `<split>-*.parquet`).
    blink_split / blink_subsets: which of BLINK's splits and subsets ('' paths are skipped).
    prompt_suffix: appended (after a newline) to every question and its options.
    max_new_tokens: the decoding budget per question (greedy decoding).
    min_pixels / max_pixels: bounds on each image's resized area (HF's Qwen2-VL processor).
    batch_size: questions per global batch (a multiple of the mesh's data * fsdp).
    limit: > 0 evaluates only the first `limit` questions of each subset (quick checks).
    judge: '' or 'package.module:function', called as `function(question, reference,
      prediction) -> bool` for answers the rules cannot read (see `grading.grade`).
    """

    vstar: str = ""
    wemath: str = ""
    blink: str = ""
    blink_split: str = "val"
    blink_subsets: tuple[str, ...] = PAPER_BLINK_SUBSETS
    prompt_suffix: str = PROMPT_SUFFIX
    max_new_tokens: int = 8192
    min_pixels: int = 401_408
    max_pixels: int = 4_014_080
    batch_size: int = 8
    limit: int = 0
    judge: str = ""

    def __post_init__(self):
        if not (self.vstar or self.wemath or self.blink):
            raise ValueError(f"vstar={self.vstar!r}: expected a path in at least one of vstar, wemath, blink")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: expected >= 1")
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(f"min_pixels={self.min_pixels}: expected 0 < min_pixels <= max_pixels={self.max_pixels}")
        if self.batch_size < 1 or self.limit < 0:
            raise ValueError(f"batch_size={self.batch_size}: expected >= 1 (and limit={self.limit} >= 0)")
        if self.blink and not self.blink_subsets:
            raise ValueError(f"blink_subsets={self.blink_subsets!r}: expected at least one subset name")
        if self.judge and not _JUDGE_SPEC.match(self.judge):
            raise ValueError(f"judge={self.judge!r}: expected 'package.module:function'")


def user_text(stem: str, options: tuple[str, ...], suffix: str) -> str:
    """The question as the model reads it: the stem, the options as '(A) text' lines, the suffix."""
    lines = [stem.rstrip(), *(f"({chr(65 + k)}) {text}" for k, text in enumerate(options))]
    return "\n".join(lines + [suffix] if suffix else lines)

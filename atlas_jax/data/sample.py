"""One training / evaluation example, as produced by the synthetic suite or imported from JSONL."""

from __future__ import annotations

import dataclasses

from PIL import Image


@dataclasses.dataclass
class Sample:
    """images: PIL images shown before the question, in order.
    question: the user's text (untrusted: it never becomes special tokens).
    response: the assistant trajectory, with functional tokens, ending in `\\boxed{answer}`.
    answer: the verifiable answer (the content of the box).
    task: the task family name (e.g. 'shape_count'); '' for user data.
    response_answer_only: the trajectory without functional tokens or reasoning, for baselines.
    uid: a stable identifier (split/task/seed/index) used in error messages.
    origin: where the record was first read, as 'FILE:LINE' (set by the JSONL import, never by the
      user: a uid may be anything); '' when generated. Errors about the record name it.
    ops: names of the functional tokens the question calls for (`functional_tokens` names, e.g.
      ('line',)), read by the expected-usage reward before the synthetic task table; () when not
      given (user data without an `ops` field, and the synthetic suite, whose tasks name theirs).
    target_box: (x0, y0, x1, y1), ends exclusive, the pixels of the first image holding the object
      the trajectory's functional token acts on (the cell-scene families; `Drawn.target_box`), for
      evaluation's localisation metric; () when unknown.
    """

    images: list[Image.Image]
    question: str
    response: str
    answer: str
    task: str = ""
    response_answer_only: str = ""
    uid: str = ""
    origin: str = ""
    ops: tuple[str, ...] = ()
    target_box: tuple[int, ...] = ()


class BadRecordError(ValueError):
    """A data record that cannot be used. The message names the source, the record and the field."""

    def __init__(self, source: str, record: str | int, field: str, problem: str):
        self.source, self.record, self.field, self.problem = source, record, field, problem
        super().__init__(f"{source}, record {record}, field {field!r}: {problem}")

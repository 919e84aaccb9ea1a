"""Import of user data: a JSONL file plus image files, validated line by line into records.

Each non-blank line is a JSON object:

    {"images": ["img/0001.png", ...],   # paths relative to the JSONL file's folder, or absolute
     "question": "...", "response": "... \\\\boxed{42}", "answer": "42",
     "task": "...", "response_answer_only": "...", "uid": "..."}   # these three are optional

Other keys are ignored. Each record also keeps `origin` = '<path>:<line>' (path as given), so an
error found later (e.g. a sample too long for the pipeline's max_length) names the JSONL line even
when the user chose the uid. Images are stored as the file's original bytes (no re-encoding), after
checking that they decode fully. Every rule of `records.validate_sample` applies, plus: valid JSON,
existing image files, and unique `uid`s (default `<file name>:<line>`). A bad line raises
`BadRecordError` naming the file, the line and the field, or with `skip_bad_records=True` is
skipped and counted in the `ImportReport` by reason ('<field>: <kind>', e.g.
'images: unreadable or truncated image').

To read imported data through the same random-access path as the synthetic suite, store it with
`tfds_builder.build_user_dataset` (an ArrayRecord TFDS dataset) and open it with `load_split`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Iterator

from atlas_jax.data.records import ORIGIN_FIELD, REQUIRED_FIELDS, decode_record
from atlas_jax.data.sample import BadRecordError

log = logging.getLogger(__name__)

# Keep only the first few messages: enough to act on, bounded for huge files.
_MAX_EXAMPLES = 20


@dataclasses.dataclass
class ImportReport:
    """What an import kept and skipped. skipped_by_reason: '<field>: <kind>' -> count;
    examples: the first error messages, verbatim."""

    path: str
    num_lines: int = 0
    num_records: int = 0
    num_skipped: int = 0
    skipped_by_reason: dict[str, int] = dataclasses.field(default_factory=dict)
    examples: list[str] = dataclasses.field(default_factory=list)

    def add_skip(self, error: BadRecordError) -> None:
        self.num_skipped += 1
        reason = skip_reason(error)
        self.skipped_by_reason[reason] = self.skipped_by_reason.get(reason, 0) + 1
        if len(self.examples) < _MAX_EXAMPLES:
            self.examples.append(str(error))

    def summary(self) -> str:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped_by_reason.items()))
        return f"{self.path}: {self.num_records} records kept, {self.num_skipped} skipped" + (f" ({reasons})" if reasons else "")


def skip_reason(error: BadRecordError) -> str:
    """'<field>: <kind>' for counting, e.g. 'images: missing image file' (indices dropped from
    the field, details dropped from the problem)."""
    field = re.sub(r"\[\d+\]$", "", str(error.field))
    return f"{field}: {error.problem.split(':', 1)[0]}"


def iter_jsonl(
    path: str | os.PathLike,
    *,
    skip_bad_records: bool = False,
    report: ImportReport | None = None,
    min_images: int = 1,
    max_images: int | None = None,
) -> Iterator[dict]:
    """Validated records of the JSONL file at `path`, one at a time (images held for one line only).

    report: filled in as lines are read (complete once the iterator is exhausted).
    """
    path = os.fspath(path)
    report = report if report is not None else ImportReport(path)
    base_dir = os.path.dirname(os.path.abspath(path))
    seen_uids: dict[str, int] = {}
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise FileNotFoundError(f"user data file {path}: cannot open: {e}") from e
    with f:
        line_no = 0
        while True:
            try:
                line = f.readline()
            except UnicodeDecodeError as e:
                # The rest of the file cannot be trusted to split into lines; stop here, loudly.
                raise BadRecordError(path, f"line {line_no + 1}", "<line>", f"invalid UTF-8: {e}") from e
            if not line:
                break
            line_no += 1
            report.num_lines += 1
            if not line.strip():
                continue
            try:
                record = _line_record(line, path, line_no, base_dir, min_images, max_images)
                if record["uid"] in seen_uids:
                    raise BadRecordError(path, f"line {line_no}", "uid", f"duplicate uid: {record['uid']!r} already used at line {seen_uids[record['uid']]}")
            except BadRecordError as e:
                if not skip_bad_records:
                    raise
                report.add_skip(e)
                log.debug("skipping %s", e)
                continue
            seen_uids[record["uid"]] = line_no
            report.num_records += 1
            yield record
    if report.num_skipped:
        log.warning("%s", report.summary())


def import_jsonl(
    path: str | os.PathLike,
    *,
    skip_bad_records: bool = False,
    min_images: int = 1,
    max_images: int | None = None,
) -> tuple[list[dict], ImportReport]:
    """All validated records of the JSONL file at `path`, and what was kept and skipped.

    Raises BadRecordError (file, line, field) on the first bad line unless `skip_bad_records`.
    """
    report = ImportReport(os.fspath(path))
    records = list(iter_jsonl(path, skip_bad_records=skip_bad_records, report=report, min_images=min_images, max_images=max_images))
    return records, report


def _line_record(line: str, path: str, line_no: int, base_dir: str, min_images: int, max_images: int | None) -> dict:
    where = f"line {line_no}"
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadRecordError(path, where, "<line>", f"invalid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise BadRecordError(path, where, "<line>", f"wrong type: expected a JSON object, got {type(raw).__name__}")
    for field in REQUIRED_FIELDS:
        if field not in raw:
            raise BadRecordError(path, where, field, "missing field: required")
    paths = raw["images"]
    if not isinstance(paths, list):
        raise BadRecordError(path, where, "images", f"wrong type: expected a list of image paths, got {type(paths).__name__}")
    images = []
    for i, image_path in enumerate(paths):
        if not isinstance(image_path, str) or not image_path:
            raise BadRecordError(path, where, f"images[{i}]", f"wrong type: expected an image path string, got {image_path!r}")
        full = image_path if os.path.isabs(image_path) else os.path.join(base_dir, image_path)
        try:
            with open(full, "rb") as image_file:
                images.append(image_file.read())
        except OSError as e:
            raise BadRecordError(path, where, f"images[{i}]", f"missing image file: {full} ({e.strerror})") from e
    record = {
        "images": images,
        "question": raw["question"],
        "response": raw["response"],
        "answer": raw["answer"],
        "task": raw.get("task", ""),
        "response_answer_only": raw.get("response_answer_only", ""),
        "uid": raw.get("uid", f"{os.path.basename(path)}:{line_no}"),
    }
    # Decoding validates every field and image; the decoded Sample itself is not kept.
    decode_record(record, path, where, min_images=min_images, max_images=max_images)
    record[ORIGIN_FIELD] = f"{path}:{line_no}"
    return record

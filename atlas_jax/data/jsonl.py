"""Import of user data: a JSONL file plus image files, validated line by line into records.

Each non-blank line is a JSON object:

    {"images": ["img/0001.png", ...],   # paths relative to the JSONL file's folder, or absolute
     "question": "...", "response": "... \\\\boxed{42}", "answer": "42",
     "task": "...", "response_answer_only": "...", "uid": "...",   # these four are optional
     "ops": ["line", ...]}   # functional operations the question calls for (expected-usage reward)

`ops` names functional tokens (`functional_tokens.DEFAULT_TOKENS`: manip, line, arrow, shape,
text; case ignored, stored in that spelling); a record's ops take precedence over the synthetic
task table in the `expected_usage` reward. Other keys are ignored. Each record also keeps
`origin` = '<path>:<line>' (path as given), so an error found later (e.g. a sample too long for
the pipeline's max_length) names the JSONL line even when the user chose the uid. Images are stored as the file's original bytes (no re-encoding), after
checking that they decode fully. Every rule of `records.validate_sample` applies, plus: valid UTF-8
and JSON on each line, image paths naming existing regular files of at most `MAX_IMAGE_BYTES` (never
a FIFO or a device), and unique `uid`s (default `<file name>:<line>`). A bad line raises
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
import stat
from collections.abc import Iterator

from atlas_jax.data.records import OPS_FIELD, ORIGIN_FIELD, REQUIRED_FIELDS, decode_record
from atlas_jax.data.sample import BadRecordError

log = logging.getLogger(__name__)

# Keep only the first few messages: enough to act on, bounded for huge files.
_MAX_EXAMPLES = 20
# Bigger than any photo a question is about; a larger file (or a device like /dev/zero) is refused
# rather than read into memory.
MAX_IMAGE_BYTES = 64 * 2**20


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
    max_image_bytes: int = MAX_IMAGE_BYTES,
) -> Iterator[dict]:
    """Validated records of the JSONL file at `path`, one at a time (images held for one line only).

    report: filled in as lines are read (complete once the iterator is exhausted).
    max_image_bytes: the largest image file read; a bigger one is a bad record.
    """
    path = os.fspath(path)
    report = report if report is not None else ImportReport(path)
    base_dir = os.path.dirname(os.path.abspath(path))
    seen_uids: dict[str, int] = {}
    try:
        # Binary: lines split on b"\n" and each is decoded alone, so a bad byte is reported on its
        # own line and skipping drops that line only.
        f = open(path, "rb")
    except OSError as e:
        raise FileNotFoundError(f"user data file {path}: cannot open: {e}") from e
    with f:
        for line_no, line in enumerate(f, start=1):
            report.num_lines += 1
            if not line.strip():
                continue
            try:
                record = _line_record(line, path, line_no, base_dir, min_images, max_images, max_image_bytes)
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
    max_image_bytes: int = MAX_IMAGE_BYTES,
) -> tuple[list[dict], ImportReport]:
    """All validated records of the JSONL file at `path`, and what was kept and skipped.

    Raises BadRecordError (file, line, field) on the first bad line unless `skip_bad_records`.
    """
    report = ImportReport(os.fspath(path))
    records = list(
        iter_jsonl(
            path,
            skip_bad_records=skip_bad_records,
            report=report,
            min_images=min_images,
            max_images=max_images,
            max_image_bytes=max_image_bytes,
        )
    )
    return records, report


def _line_record(
    line: bytes, path: str, line_no: int, base_dir: str, min_images: int, max_images: int | None, max_image_bytes: int
) -> dict:
    where = f"line {line_no}"
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRecordError(path, where, "<line>", f"invalid UTF-8: byte {line[e.start]:#04x} at column {e.start + 1}") from e
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadRecordError(path, where, "<line>", f"invalid JSON: {e}") from e
    except RecursionError as e:
        raise BadRecordError(path, where, "<line>", "invalid JSON: values nested too deeply") from e
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
        images.append(_read_image_file(full, max_image_bytes, lambda problem: BadRecordError(path, where, f"images[{i}]", problem)))
    record = {
        "images": images,
        "question": raw["question"],
        "response": raw["response"],
        "answer": raw["answer"],
        "task": raw.get("task", ""),
        "response_answer_only": raw.get("response_answer_only", ""),
        "uid": raw.get("uid", f"{os.path.basename(path)}:{line_no}"),
        OPS_FIELD: raw.get(OPS_FIELD, []),
    }
    # Decoding validates every field and image; of the decoded Sample only the ops' spelling is kept.
    sample = decode_record(record, path, where, min_images=min_images, max_images=max_images)
    record[OPS_FIELD] = list(sample.ops)
    record[ORIGIN_FIELD] = f"{path}:{line_no}"
    return record


def _read_image_file(full: str, max_bytes: int, bad) -> bytes:
    """The bytes of the regular file `full`, at most `max_bytes` of them; anything else raises
    `bad(problem)`. Opened non-blocking and checked on the open descriptor, so a FIFO cannot hang
    the import and a device or a file swapped in after a check is still refused."""
    if "\0" in full:
        raise bad(f"invalid path: {full!r} contains a NUL byte")
    try:
        fd = os.open(full, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise bad(f"missing image file: {full} ({e.strerror})") from e
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise bad(f"not a regular file: {full} (images are read from regular files only)")
        size = info.st_size
        if size <= max_bytes:
            with open(fd, "rb", closefd=False) as image_file:
                data = image_file.read(max_bytes + 1)  # +1: a file that grew since fstat is caught too
            size = len(data)
        if size > max_bytes:
            raise bad(f"image file too large: {full} has {size} bytes or more, at most {max_bytes} are read")
    finally:
        os.close(fd)
    return data

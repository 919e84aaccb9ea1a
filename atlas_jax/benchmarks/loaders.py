"""Readers for the paper's benchmarks in the layouts of their public releases.

    V* Bench (craigwu/vstar_bench)  DIR/test_questions.jsonl, one question per line:
        image        str   path of the image, relative to DIR ('direct_attributes/sa_4690.jpg')
        text         str   the question, its options as '(A) ...' lines, the answer instruction
        category     str   'direct_attributes' | 'relative_position'   (the subset)
        question_id  int   label: str, the option letter ('A')
    WeMath testmini (We-Math/We-Math)  testmini.json (a list; as in the authors' GitHub release,
    data/testmini.json beside data/<n>steps/image/) or the Hub's data/testmini-*.parquet:
        ID           str   '<n>steps_<k>' (the subset is '<n>steps')
        question     str   option: str, 'A. 200.96;B. 3215.36;...' ('' for free-form)
        answer       str   the option letter
        image_path   str   path relative to the JSON file's directory; in the parquet file an
                           image struct {bytes, path}
    BLINK (BLINK-Benchmark/BLINK)  DIR/<Subset>/<split>-00000-of-00001.parquet, one per subset:
        idx, sub_task str; question str; prompt str (the question framed for its images, with
        its options); choices list[str]; answer '(A)'; image_1..image_4 {bytes, path} or null

Every question becomes a `BenchmarkItem`. No `response` field is needed. A row that cannot be
used is a `BadRecordError` naming the file and the row ('line 7' in JSONL, 'row 7' otherwise,
counted from 1) and the field; images are checked to exist here and decoded when batched.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import io
import json
import os
import re
from collections.abc import Iterator

from PIL import Image

from atlas_jax.benchmarks.protocol import BenchmarkConfig, user_text
from atlas_jax.data.records import decode_image
from atlas_jax.data.sample import BadRecordError
from atlas_jax.model.config import ConfigError

_OPTION_LINE = re.compile(r"^\(([A-Z])\)\s*(.*)$")
_LETTER_INSTRUCTION = re.compile(r"^answer with the option'?s letter", re.IGNORECASE)
_WEMATH_OPTION = re.compile(r"(?:^|;)\s*([A-Z])\.\s*")


@dataclasses.dataclass(frozen=True)
class BenchmarkItem:
    """One question. options: the option texts in letter order (() for free-form); answer: the
    correct option's letter, or the free-form reference; images: file paths or encoded bytes;
    source, row: where it was read, for error messages."""

    benchmark: str
    subset: str
    uid: str
    stem: str
    options: tuple[str, ...]
    answer: str
    images: tuple[str | bytes, ...]
    source: str
    row: str

    def question(self, suffix: str) -> str:
        return user_text(self.stem, self.options, suffix)

    def reference(self) -> str:
        """The answer as a person reads it ('(B) leather')."""
        if not self.options:
            return self.answer
        return f"({self.answer}) {self.options[ord(self.answer) - 65]}"

    def image_sizes(self) -> list[tuple[int, int]]:
        """(width, height) of each image, from its header only (cheap)."""
        sizes = []
        for k, image in enumerate(self.images):
            data = io.BytesIO(image) if isinstance(image, bytes) else image
            try:
                with Image.open(data) as probe:
                    sizes.append(probe.size)
            except Exception as e:  # PIL raises OSError, SyntaxError, ...
                raise BadRecordError(self.source, self.row, f"images[{k}]", f"unreadable image: {type(e).__name__}: {e}") from e
        return sizes

    def load_images(self) -> list[Image.Image]:
        """The decoded images (truncated or corrupt data is a BadRecordError naming the row)."""
        out = []
        for k, image in enumerate(self.images):
            if isinstance(image, str):
                with open(image, "rb") as f:
                    image = f.read()
            out.append(decode_image(image, self.source, self.row, f"images[{k}]"))
        return out


def load(cfg: BenchmarkConfig) -> dict[str, list[BenchmarkItem]]:
    """The configured benchmarks' questions ({name: items}), the first `cfg.limit` of each subset
    when limit > 0."""
    found = {}
    if cfg.vstar:
        found["vstar"] = load_vstar(cfg.vstar)
    if cfg.wemath:
        found["wemath"] = load_wemath(cfg.wemath)
    if cfg.blink:
        found["blink"] = load_blink(cfg.blink, cfg.blink_subsets, cfg.blink_split)
    for name, items in found.items():
        if not items:
            raise ConfigError(f"config.benchmark.{name}={getattr(cfg, name)!r}: holds no questions")
    if cfg.limit:
        found = {name: _first_per_subset(items, cfg.limit) for name, items in found.items()}
    return found


def _first_per_subset(items: list[BenchmarkItem], limit: int) -> list[BenchmarkItem]:
    taken: collections.Counter = collections.Counter()
    kept = []
    for item in items:
        if taken[item.subset] < limit:
            taken[item.subset] += 1
            kept.append(item)
    return kept


def load_vstar(path: str) -> list[BenchmarkItem]:
    file = path if os.path.isfile(path) else os.path.join(path, "test_questions.jsonl")
    items = []
    for row, r in _rows(file):
        field = _Fields(file, row, r)
        stem, options = split_options(field.get("text", str))
        if len(options) < 2:
            raise field.bad("text", "no options: expected '(A) ...' lines after the question")
        items.append(BenchmarkItem(
            "vstar", field.get("category", str), f"vstar/{r.get('question_id', row)}", stem, options,
            field.letter("label", field.get("label", str), options), (field.image("image", r.get("image")),), file, row,
        ))
    return items


def load_wemath(path: str) -> list[BenchmarkItem]:
    items = []
    for row, r in _rows(path):
        field = _Fields(path, row, r)
        uid = field.get("ID", str)
        option = field.get("option", str)
        options = _wemath_options(field, option) if option.strip() else ()
        answer = field.get("answer", str).strip()
        if options:
            answer = field.letter("answer", answer, options)
        items.append(BenchmarkItem(
            "wemath", uid.rsplit("_", 1)[0], f"wemath/{uid}", field.get("question", str), options, answer,
            (field.image("image_path", r.get("image_path")),), path, row,
        ))
    return items


def load_blink(root: str, subsets: tuple[str, ...], split: str) -> list[BenchmarkItem]:
    items = []
    for subset in subsets:
        files = sorted(glob.glob(os.path.join(root, subset, f"{split}-*.parquet")))
        if not files:
            raise ConfigError(f"config.benchmark.blink={root!r}: no {os.path.join(root, subset, split + '-*.parquet')} "
                              f"(subset {subset!r} of benchmark.blink_subsets, split benchmark.blink_split={split!r})")
        for file in files:
            for row, r in _rows(file):
                field = _Fields(file, row, r)
                options = tuple(field.get("choices", list))
                # `prompt` frames the question for its images ("the second image ..."); keep its
                # stem, not its option lines, which `choices` gives.
                stem = split_options(r.get("prompt") or field.get("question", str))[0]
                images = tuple(field.image(f"image_{k}", r[f"image_{k}"]) for k in range(1, 5) if r.get(f"image_{k}") is not None)
                if not images:
                    raise field.bad("image_1", "missing: every BLINK question has at least one image")
                answer = field.get("answer", str)
                if answer.strip().lower() == "hidden":
                    raise field.bad("answer", f"{answer!r}: the {split!r} split's answers are not public; set benchmark.blink_split='val'")
                items.append(BenchmarkItem(
                    "blink", subset, f"blink/{subset}/{r.get('idx', row)}", stem, options,
                    field.letter("answer", answer, options), images, file, row,
                ))
    return items


def split_options(text: str) -> tuple[str, tuple[str, ...]]:
    """(stem, option texts) of a question that lists its options as '(A) ...' lines; the
    release's own answer instruction ('Answer with the option's letter ...') is dropped, since the
    protocol's suffix replaces it."""
    stem, options = [], []
    for line in text.strip().splitlines():
        m = _OPTION_LINE.match(line.strip())
        if m and ord(m.group(1)) - 65 == len(options):
            options.append(m.group(2).strip())
        elif not _LETTER_INSTRUCTION.match(line.strip()):
            stem.append(line)
    return "\n".join(stem).strip(), tuple(options)


def _wemath_options(field: _Fields, text: str) -> tuple[str, ...]:
    parts = _WEMATH_OPTION.split(text.strip())  # ['', 'A', '200.96', 'B', ...]
    letters, texts = parts[1::2], [t.strip().rstrip(";").strip() for t in parts[2::2]]
    if parts[0].strip() or letters != [chr(65 + k) for k in range(len(letters))]:
        raise field.bad("option", f"{text[:120]!r}: expected 'A. ...;B. ...' with letters in order")
    return tuple(texts)


def _rows(path: str) -> Iterator[tuple[str, dict]]:
    """(row name, record) of a JSONL ('line N'), JSON list or parquet file ('row N'), from 1."""
    if not os.path.isfile(path):
        raise ConfigError(f"benchmark file {path!r} does not exist")
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        yield from ((f"row {i + 1}", r) for i, r in enumerate(pq.read_table(path).to_pylist()))
        return
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
            for n, line in lines:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise BadRecordError(path, f"line {n}", "<record>", f"invalid JSON: {e}") from None
                yield f"line {n}", record
            return
        data = json.load(f)
    if not isinstance(data, list):
        raise BadRecordError(path, "<file>", "<record>", f"expected a JSON list of questions, got {type(data).__name__}")
    yield from ((f"row {i + 1}", r) for i, r in enumerate(data))


class _Fields:
    """Typed access to one row's fields; every failure names the file, the row and the field."""

    def __init__(self, source: str, row: str, record):
        self.source, self.row, self.record = source, row, record
        if not isinstance(record, dict):
            raise self.bad("<record>", f"wrong type: expected an object of fields, got {type(record).__name__}")

    def bad(self, field: str, problem: str) -> BadRecordError:
        return BadRecordError(self.source, self.row, field, problem)

    def get(self, name: str, kind: type):
        if name not in self.record or self.record[name] is None:
            raise self.bad(name, "missing field: required")
        value = self.record[name]
        if not isinstance(value, kind):
            raise self.bad(name, f"wrong type: expected {kind.__name__}, got {type(value).__name__}")
        return value

    def letter(self, name: str, answer: str, options: tuple[str, ...]) -> str:
        """The option letter of an answer written 'B' or '(B)', checked against the options."""
        letter = answer.strip().strip("()").strip()
        if not (len(letter) == 1 and 0 <= ord(letter) - 65 < len(options)):
            raise self.bad(name, f"{answer!r}: expected an option letter A..{chr(64 + len(options))}")
        return letter

    def image(self, name: str, value) -> str | bytes:
        """An image given as a path (relative to the file's directory) or a {bytes, path} struct."""
        if isinstance(value, dict) and value.get("bytes"):
            return bytes(value["bytes"])
        path = value.get("path") if isinstance(value, dict) else value
        if not isinstance(path, str) or not path:
            raise self.bad(name, f"wrong type: expected an image path or {{bytes, path}}, got {type(value).__name__}")
        full = os.path.join(os.path.dirname(os.path.abspath(self.source)), path)
        if not os.path.isfile(full):
            raise self.bad(name, f"no such image file {full!r}")
        return full

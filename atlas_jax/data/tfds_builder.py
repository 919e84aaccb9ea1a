"""TFDS builders that store records (see `records.py`) as ArrayRecord files, and random-access reading.

Two builders share one feature spec and one reading path (`load_split`):
- `AtlasSynthetic`: the built-in synthetic task suite stored (a fixed set; jobs stream it on the fly
  unless `data.num_per_task` > 0), splits train / in_distribution / shifted / hard, with
  configs `tiny` (seconds to build), `small` and `default`;
- `AtlasUserData`: user JSONL files imported and validated by `jsonl.import_jsonl`; each split is
  one JSONL file (see `build_user_dataset`).

No TensorFlow is needed or imported: images are kept as their encoded bytes in a
`Sequence(Tensor(shape=(), dtype=object))` (serialised as a bytes list by TFDS's pure-protobuf
example writer) rather than `tfds.features.Image`, which needs TensorFlow to encode and decode.
Text fields are `tfds.features.Text`; TFDS hands them back as utf-8 bytes, `load_split` returns str.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds
from array_record.python.array_record_module import ArrayRecordReader
from etils import epath

from atlas_jax.data import jsonl
from atlas_jax.data.records import OPS_FIELD, ORIGIN_FIELD, TEXT_FIELDS, encode_sample
from atlas_jax.data.synthetic.family import SPLITS  # train and the evaluation conditions

DATASET_VERSION = "1.0.0"

log = logging.getLogger(__name__)

# TFDS derives a builder's code path from its package; for an editable install that lookup
# imports `importlib_resources`, which TFDS does not declare. Stating the path avoids it.
_CODE_PATH = epath.Path(__file__)


def record_features(imported: bool = False) -> tfds.features.FeaturesDict:
    """The stored record: encoded image bytes plus the text fields of `records.py`, and for
    imported data `origin` (the JSONL file:line) and `ops` (the functional ops the record expects)."""
    fields = {"images": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_))}
    fields.update({name: tfds.features.Text() for name in TEXT_FIELDS + ((ORIGIN_FIELD,) if imported else ())})
    if imported:
        fields[OPS_FIELD] = tfds.features.Sequence(tfds.features.Text())
    return tfds.features.FeaturesDict(fields)


# ---------------------------------------------------------------- synthetic suite


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
    """num_per_task: samples per task for each split; image_size: passed to the generator (None:
    its default); seed: the generator seed (held-out splits also differ in layout)."""

    num_per_task: Mapping[str, int] = dataclasses.field(default_factory=dict)
    image_size: int | None = None
    seed: int = 0


def _sizes(train: int, held_out: int) -> dict[str, int]:
    return {"train": train, **{split: held_out for split in SPLITS[1:]}}


SYNTHETIC_CONFIGS: dict[str, SyntheticConfig] = {
    c.name: c
    for c in (
        SyntheticConfig(name="tiny", description="A few samples per task: tests, quickstart.", num_per_task=_sizes(4, 2)),
        SyntheticConfig(name="small", description="Laptop-scale runs.", num_per_task=_sizes(200, 20)),
        SyntheticConfig(name="default", description="Full-size suite.", num_per_task=_sizes(5000, 200)),
    )
}


def _synthetic_split(split: str, num_per_task: int, seed: int, image_size: int | None):
    """Samples of one split from the synthetic suite (imported late: building is its only user
    here, and tests may substitute it)."""
    from atlas_jax.data.synthetic import generate_split

    return generate_split(split, num_per_task, seed=seed, image_size=image_size)


class AtlasSynthetic(tfds.core.GeneratorBasedBuilder):
    """The built-in synthetic ATLAS task suite (procedural images + functional-token trajectories)."""

    VERSION = tfds.core.Version(DATASET_VERSION)
    RELEASE_NOTES = {DATASET_VERSION: "Initial release."}
    code_path = _CODE_PATH
    BUILDER_CONFIGS = list(SYNTHETIC_CONFIGS.values())
    DEFAULT_CONFIG_NAME = "tiny"

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo directly: `dataset_info_from_configs` wants metadata files next to the code.
        return tfds.core.DatasetInfo(builder=self, description=self.__doc__, features=record_features())

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing is downloaded.
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split: str) -> Iterator[tuple[str, dict]]:
        config = self.builder_config
        for sample in _synthetic_split(split, config.num_per_task[split], config.seed, config.image_size):
            yield sample.uid, encode_sample(sample)


def synthetic_config_name(config: str = "tiny", *, num_per_task: int | None = None, image_size: int | None = None, seed: int = 0) -> str:
    """The config name a dataset built with these arguments is stored under: the base config's name,
    plus the overrides (e.g. 'tiny_n8_s224_seed1') so differently sized builds never collide."""
    if config not in SYNTHETIC_CONFIGS:
        raise ValueError(f"synthetic config {config!r} is unknown; expected one of {sorted(SYNTHETIC_CONFIGS)}")
    name = config
    if num_per_task is not None:
        name += f"_n{num_per_task}"
    if image_size is not None:
        name += f"_s{image_size}"
    if seed:
        name += f"_seed{seed}"
    return name


def build_synthetic(data_dir: str, config: str = "tiny", *, num_per_task: int | None = None, image_size: int | None = None, seed: int = 0) -> str:
    """Build the synthetic suite as ArrayRecord under `data_dir` (a no-op when already built) and
    return the dataset directory. num_per_task overrides the config's count for every split; read
    the result with `load_split(data_dir, split, synthetic_config_name(...))`.

    A stored build whose split sizes no longer match the suite (a task family was added or
    removed since) is rebuilt rather than silently reused. On a pod with a shared `data_dir`,
    build on process 0 and wait at a barrier before other hosts call `load_split`.
    """
    name = synthetic_config_name(config, num_per_task=num_per_task, image_size=image_size, seed=seed)
    if num_per_task is not None and num_per_task < 1:
        raise ValueError(f"num_per_task must be >= 1, got {num_per_task}")
    base = SYNTHETIC_CONFIGS[config]
    builder_config = base
    if name != config:
        builder_config = SyntheticConfig(
            name=name,
            description=f"{config} with overrides num_per_task={num_per_task}, image_size={image_size}, seed={seed}",
            num_per_task=dict(base.num_per_task) if num_per_task is None else _sizes(num_per_task, num_per_task),
            image_size=base.image_size if image_size is None else image_size,
            seed=seed,
        )
    builder = AtlasSynthetic(data_dir=data_dir, config=builder_config, file_format=tfds.core.FileFormat.ARRAY_RECORD)
    stale = False
    if builder.is_prepared():
        from atlas_jax.data.synthetic import task_names

        want = {split: n * len(task_names()) for split, n in builder_config.num_per_task.items()}
        have = {split: info.num_examples for split, info in builder.info.splits.items()}
        stale = have != want
        if stale:
            log.warning("synthetic dataset %s has split sizes %s, the suite now gives %s; rebuilding", builder.data_dir, have, want)
    _prepare(builder, overwrite=stale)
    return os.fspath(builder.data_dir)


def _prepare(builder: tfds.core.DatasetBuilder, overwrite: bool = False) -> None:
    """Write the dataset unless it is already there (or regenerate it when `overwrite`)."""
    mode = tfds.download.GenerateMode.FORCE_REDOWNLOAD if overwrite else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False, download_mode=mode))


# ---------------------------------------------------------------- user JSONL data


@dataclasses.dataclass(eq=False)
class UserDataConfig(tfds.core.BuilderConfig):
    """splits: split name -> JSONL path; skip_bad_records: skip (and count) bad lines instead of
    failing; min_images: see `records.validate_sample`."""

    splits: Mapping[str, str] = dataclasses.field(default_factory=dict)
    skip_bad_records: bool = False
    min_images: int = 1


class AtlasUserData(tfds.core.GeneratorBasedBuilder):
    """User data imported from JSONL + image files, validated line by line."""

    VERSION = tfds.core.Version(DATASET_VERSION)
    RELEASE_NOTES = {DATASET_VERSION: "Initial release."}
    code_path = _CODE_PATH
    # No predefined configs: `build_user_dataset` makes one per import, named by the user, and
    # reading goes through the files (TFDS reads a config unknown to the code from disk).

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=self.__doc__, features=record_features(imported=True))

    def _split_generators(self, dl_manager):
        del dl_manager
        config = self.builder_config
        if not config.splits:
            raise ValueError(f"user dataset config {config.name!r} names no JSONL files; use build_user_dataset")
        self.import_reports = {}
        generators = {}
        for split, path in config.splits.items():
            # Streamed, so a large import never holds all images; the report fills in as it goes.
            report = self.import_reports[split] = jsonl.ImportReport(path)
            records = jsonl.iter_jsonl(path, skip_bad_records=config.skip_bad_records, report=report, min_images=config.min_images)
            generators[split] = self._generate_examples(records)
        return generators

    def _generate_examples(self, records: Iterator[dict]) -> Iterator[tuple[str, dict]]:
        for record in records:
            yield record["uid"], record


_REPORTS_FILE = "import_reports.json"
_USER_LAYOUT = "origin,ops"  # what the stored records hold beyond TEXT_FIELDS


def build_user_dataset(
    data_dir: str,
    splits: Mapping[str, str | os.PathLike],
    *,
    name: str = "user",
    skip_bad_records: bool = False,
    min_images: int = 1,
    overwrite: bool = False,
) -> tuple[str, dict[str, jsonl.ImportReport]]:
    """Import JSONL files (split name -> path) into an ArrayRecord dataset `atlas_user_data/<name>`
    under `data_dir`, read back with `load_split(data_dir, split, name, dataset='atlas_user_data')`.

    Returns (dataset directory, per-split ImportReport). The build is reused while the JSONL files'
    contents and the options are unchanged, and redone when they change (a fingerprint of both is
    kept in the dataset's description). Image files are not fingerprinted: after editing images
    in place, pass `overwrite=True`. Reports are kept in `import_reports.json` beside the data.
    """
    paths = {split: os.path.abspath(os.fspath(path)) for split, path in splits.items()}
    # _USER_LAYOUT is in the fingerprint so a build stored by older code (no `origin`, no `ops`) is redone.
    digest = hashlib.sha256(json.dumps([sorted(paths.items()), skip_bad_records, min_images, _USER_LAYOUT]).encode())
    for split in sorted(paths):
        try:
            with open(paths[split], "rb") as f:
                digest.update(f.read())
        except OSError as e:
            raise FileNotFoundError(f"user data for split {split!r}: cannot read {paths[split]}: {e}") from e
    fingerprint = f"jsonl-sha256:{digest.hexdigest()}"
    config = UserDataConfig(name=name, description=fingerprint, splits=paths, skip_bad_records=skip_bad_records, min_images=min_images)
    builder = AtlasUserData(data_dir=data_dir, config=config, file_format=tfds.core.FileFormat.ARRAY_RECORD)
    reports_path = os.path.join(os.fspath(builder.data_dir), _REPORTS_FILE)

    stale = overwrite
    if builder.is_prepared() and not stale:
        stored = tfds.builder_from_directory(builder.data_dir).info.config_description
        stale = stored != fingerprint or not os.path.exists(reports_path)
        if stale:
            log.info("user dataset %s: JSONL files or options changed; rebuilding", builder.data_dir)
    _prepare(builder, overwrite=stale)
    if hasattr(builder, "import_reports"):  # Built in this call.
        with open(reports_path, "w") as f:
            json.dump({s: dataclasses.asdict(r) for s, r in builder.import_reports.items()}, f, indent=1)
        reports = builder.import_reports
    else:
        with open(reports_path) as f:
            reports = {s: jsonl.ImportReport(**r) for s, r in json.load(f).items()}
    for split, report in reports.items():
        log.info("user dataset %s split %s: %s", name, split, report.summary())
    return os.fspath(builder.data_dir), reports


# ---------------------------------------------------------------- reading


class StoredDatasetError(RuntimeError):
    """A stored dataset file that cannot be read (truncated or corrupted on disk); the message names
    it and says how to rebuild the dataset."""


class RecordSource(Sequence):
    """Random access to one stored split: `len()`, `[i]` -> record dict (str text fields,
    `images` a list of encoded bytes). Picklable, so Grain workers can hold it."""

    def __init__(self, data_source, source: str, rebuild: str):
        self._data_source = data_source
        self.source = source  # For error messages: 'atlas_synthetic/tiny:train'.
        self.rebuild = rebuild  # How to rebuild the dataset, for errors about its files.

    def __len__(self) -> int:
        return len(self._data_source)

    def __getitem__(self, index: int) -> dict:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        size = len(self)
        if not -size <= index < size:
            # IndexError (the sequence protocol), not the ValueError ArrayRecord raises.
            raise IndexError(f"{self.source}: index {index} out of range for {size} records")
        return self.__getitems__([index % size])[0]

    def __iter__(self) -> Iterator[dict]:
        for index in range(len(self)):
            yield self[index]

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        try:
            items = self._data_source.__getitems__(list(indices))
        except RuntimeError as e:  # ArrayRecord's 'Corrupted Riegeli/records file' on a damaged chunk
            raise StoredDatasetError(f"{self.source}: a stored data file is corrupted ({e}); {self.rebuild}") from e
        return [_to_record(item) for item in items]

    def __repr__(self) -> str:
        return f"RecordSource({self.source!r}, {len(self)} records)"


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _to_record(item: Mapping) -> dict:
    names = TEXT_FIELDS + ((ORIGIN_FIELD,) if ORIGIN_FIELD in item else ())  # imported data only
    record = {name: _text(item[name]) for name in names}
    record["images"] = [bytes(data) for data in item["images"]]
    if OPS_FIELD in item:  # imported data only
        record[OPS_FIELD] = [_text(name) for name in item[OPS_FIELD]]
    return record


def load_split(data_dir: str, split: str, config: str = "tiny", *, dataset: str = "atlas_synthetic") -> RecordSource:
    """The stored split `split` of `dataset/config` under `data_dir`, via `tfds.data_source`
    (never builds: run `build_synthetic` / `build_user_dataset` first)."""
    name = f"{dataset}/{config}"
    try:
        data_source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:
        raise FileNotFoundError(f"cannot open split {split!r} of dataset {name!r} under {data_dir}: {e}") from e
    builder = "build_user_dataset" if dataset == "atlas_user_data" else "build_synthetic"
    rebuild = f"delete {data_source.dataset_info.data_dir} and rerun {builder} (or the job that builds it) to rebuild it"
    _check_files(data_source.dataset_info.splits[split].file_instructions, rebuild)
    return RecordSource(data_source, f"{name}:{split}", rebuild)


def _check_files(file_instructions, rebuild: str) -> None:
    """Raise StoredDatasetError naming the first data file whose ArrayRecord index does not open or
    does not hold the records the dataset info lists: a truncated file loses its index (the footer),
    so this catches it at open, reading only the footer, never a record."""
    for instruction in file_instructions:
        reader = ArrayRecordReader(instruction.filename)
        readable = 0
        if reader.ok():  # one that failed to open holds nothing to close (and close() re-raises)
            readable = reader.num_records()
            reader.close()
        if readable != instruction.examples_in_shard:
            raise StoredDatasetError(
                f"{instruction.filename}: missing, truncated or corrupted ({readable} of {instruction.examples_in_shard} "
                f"records readable); {rebuild}"
            )

"""The synthetic suite as a TFDS/ArrayRecord dataset: build offline without TensorFlow, read back
with tfds.data_source, records equal to what the generator makes."""

import json
import os
import pickle
import shutil
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from atlas_jax.data import tfds_builder
from atlas_jax.data.records import decode_record
from atlas_jax.data.synthetic import generate_split, task_names
from atlas_jax.data.tfds_builder import SPLITS, SYNTHETIC_CONFIGS, build_synthetic, load_split, synthetic_config_name


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    dataset_dir = build_synthetic(data_dir, "tiny")
    return data_dir, dataset_dir


def test_tiny_dataset_layout_is_array_record(tiny_dir):
    data_dir, dataset_dir = tiny_dir
    assert dataset_dir == os.path.join(data_dir, "atlas_synthetic", "tiny", "1.0.0")
    names = sorted(os.listdir(dataset_dir))
    for split in SPLITS:
        assert any(n.startswith(f"atlas_synthetic-{split}.array_record-") for n in names), names
    info = tfds.builder_from_directory(dataset_dir).info
    assert info.file_format == tfds.core.FileFormat.ARRAY_RECORD
    assert set(info.splits) == set(SPLITS)


@pytest.mark.parametrize("split", SPLITS)
def test_each_split_reads_back_equal_to_the_generator(tiny_dir, split):
    data_dir, _ = tiny_dir
    per_task = SYNTHETIC_CONFIGS["tiny"].num_per_task[split]
    want = {s.uid: s for s in generate_split(split, per_task)}

    # Straight through TFDS's own reader first: the stored form is plain bytes.
    raw = tfds.data_source("atlas_synthetic/tiny", split=split, data_dir=data_dir, download=False)
    assert len(raw) == per_task * len(task_names()) == len(want)
    first = raw[0]
    assert isinstance(first["question"], bytes) and all(isinstance(b, bytes) for b in first["images"])

    source = load_split(data_dir, split, "tiny")
    assert len(source) == len(want)
    seen = set()
    for i in range(len(source)):
        record = source[i]
        sample = decode_record(record, source.source, i)
        expected = want[sample.uid]
        seen.add(sample.uid)
        assert sample.uid.startswith(f"{split}/")
        for field in ("question", "response", "answer", "task", "response_answer_only"):
            assert getattr(sample, field) == getattr(expected, field), (sample.uid, field)
        assert len(sample.images) == len(expected.images)
        for got, ref in zip(sample.images, expected.images):
            assert (got.size, got.mode) == (ref.size, ref.mode)
            np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
    assert seen == set(want)
    assert {want[u].task for u in seen} == set(task_names())


def test_no_tensorflow_in_the_process(tiny_dir):
    data_dir, _ = tiny_dir
    load_split(data_dir, "train")[0]
    assert "tensorflow" not in sys.modules
    assert not any(name == "tensorflow" or name.startswith("tensorflow.") for name in sys.modules)


def test_build_is_idempotent(tiny_dir):
    data_dir, dataset_dir = tiny_dir
    files = {n: os.stat(os.path.join(dataset_dir, n)).st_mtime_ns for n in os.listdir(dataset_dir)}
    assert build_synthetic(data_dir, "tiny") == dataset_dir
    assert {n: os.stat(os.path.join(dataset_dir, n)).st_mtime_ns for n in os.listdir(dataset_dir)} == files


def test_random_access_batch_slice_and_pickle(tiny_dir):
    data_dir, _ = tiny_dir
    source = load_split(data_dir, "shifted")
    uids = [source[i]["uid"] for i in range(len(source))]
    assert [r["uid"] for r in source.__getitems__([3, 0, 3])] == [uids[3], uids[0], uids[3]]
    assert [r["uid"] for r in source[1:4]] == uids[1:4]
    assert source[-1]["uid"] == uids[-1] and [r["uid"] for r in source] == uids
    with pytest.raises(IndexError, match="atlas_synthetic/tiny:shifted"):
        source[len(source)]
    clone = pickle.loads(pickle.dumps(source))  # Grain worker processes receive the source pickled
    assert len(clone) == len(source) and clone[2] == source[2]


def test_split_slicing_is_passed_to_tfds(tiny_dir):
    data_dir, _ = tiny_dir
    full = load_split(data_dir, "train")
    head = load_split(data_dir, "train[:5]")
    assert len(head) == 5 and [head[i]["uid"] for i in range(5)] == [full[i]["uid"] for i in range(5)]


def test_grain_reads_the_source(tiny_dir):
    import grain

    data_dir, _ = tiny_dir
    source = load_split(data_dir, "hard")
    dataset = grain.MapDataset.source(source).map(lambda record: record["uid"])
    assert list(dataset) == [source[i]["uid"] for i in range(len(source))]


def test_overrides_get_their_own_config(tmp_path):
    name = synthetic_config_name("tiny", num_per_task=1, image_size=140, seed=3)
    assert name == "tiny_n1_s140_seed3"
    dataset_dir = build_synthetic(str(tmp_path), "tiny", num_per_task=1, image_size=140, seed=3)
    assert dataset_dir == os.path.join(str(tmp_path), "atlas_synthetic", name, "1.0.0")
    source = load_split(str(tmp_path), "hard", name)
    want = {s.uid: s for s in generate_split("hard", 1, seed=3, image_size=140)}
    assert len(source) == len(want) == len(task_names())
    for i in range(len(source)):
        sample = decode_record(source[i], source.source, i)
        assert sample.images[0].size == want[sample.uid].images[0].size
        np.testing.assert_array_equal(np.asarray(sample.images[0]), np.asarray(want[sample.uid].images[0]))


def test_unknown_config_and_missing_dataset_are_named(tmp_path):
    with pytest.raises(ValueError, match="'huge'.*expected one of"):
        build_synthetic(str(tmp_path), "huge")
    with pytest.raises(FileNotFoundError, match="atlas_synthetic/small"):
        load_split(str(tmp_path), "train", "small")


def test_builder_uses_the_generator_it_is_given(tmp_path, monkeypatch):
    """The builder writes exactly what the generator yields (keys = uids, order irrelevant)."""
    from atlas_jax.data.synthetic import generate

    calls = []

    def fake(split, num_per_task, seed, image_size):
        calls.append((split, num_per_task, seed, image_size))
        return [generate("shape_count", split, i, seed) for i in range(num_per_task)]

    monkeypatch.setattr(tfds_builder, "_synthetic_split", fake)
    build_synthetic(str(tmp_path), "tiny", num_per_task=2)
    assert sorted(calls) == sorted((s, 2, 0, None) for s in SPLITS)
    uids = sorted(r["uid"] for r in load_split(str(tmp_path), "train", "tiny_n2"))
    assert uids == sorted(generate("shape_count", "train", i, 0).uid for i in range(2))

    # That build has one task where the suite has several: the next build notices and rebuilds.
    monkeypatch.undo()
    build_synthetic(str(tmp_path), "tiny", num_per_task=2)
    assert len(load_split(str(tmp_path), "train", "tiny_n2")) == 2 * len(task_names())


def _data_file(dataset_dir, split):
    (name,) = [n for n in os.listdir(dataset_dir) if n.startswith(f"atlas_synthetic-{split}.array_record-")]
    return os.path.join(dataset_dir, name)


def test_truncated_data_file_is_named_with_how_to_rebuild(tmp_path):
    """A truncated ArrayRecord file is refused when the split is opened (its index is gone), naming
    the file and the rebuild; after doing what the message says, the split reads again."""
    data_dir = str(tmp_path)
    dataset_dir = build_synthetic(data_dir, "tiny", num_per_task=1)
    path = _data_file(dataset_dir, "train")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) * 9 // 10])
    with pytest.raises(tfds_builder.StoredDatasetError) as info:
        load_split(data_dir, "train", "tiny_n1")
    n = len(task_names())
    assert str(info.value) == (
        f"{path}: missing, truncated or corrupted (0 of {n} records readable); "
        f"delete {dataset_dir} and rerun build_synthetic (or the job that builds it) to rebuild it"
    )
    assert len(load_split(data_dir, "shifted", "tiny_n1")) == n  # the other splits' files are intact
    shutil.rmtree(dataset_dir)
    build_synthetic(data_dir, "tiny", num_per_task=1)
    assert len(list(load_split(data_dir, "train", "tiny_n1"))) == n


def test_corrupted_chunk_is_named_with_how_to_rebuild(tmp_path):
    """Zeroed bytes inside a data file (its index intact) fail the read of the record, not silently."""
    data_dir = str(tmp_path)
    dataset_dir = build_synthetic(data_dir, "tiny", num_per_task=1)
    path = _data_file(dataset_dir, "train")
    data = bytearray(open(path, "rb").read())
    data[100:2000] = bytes(1900)
    open(path, "wb").write(bytes(data))
    source = load_split(data_dir, "train", "tiny_n1")
    with pytest.raises(tfds_builder.StoredDatasetError, match=r"atlas_synthetic/tiny_n1:train: a stored data file is corrupted \(.*Corrupted Riegeli"):
        list(source)
    with pytest.raises(tfds_builder.StoredDatasetError, match=f"delete {dataset_dir} and rerun build_synthetic"):
        source.__getitems__([0])


def test_num_per_task_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="num_per_task must be >= 1"):
        build_synthetic(str(tmp_path), "tiny", num_per_task=0)


_POISONED_TF = """
import importlib.abc, importlib.machinery, sys

class PoisonedTensorFlow(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    # Pretends TensorFlow is installed (so code that probes for it takes its TF path) and fails
    # if anything actually imports it.
    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            return importlib.machinery.ModuleSpec(name, self)
    def create_module(self, spec):
        raise AssertionError(f"{spec.name} was imported")
    def exec_module(self, module):
        pass

sys.meta_path.insert(0, PoisonedTensorFlow())
from atlas_jax.data.tfds_builder import build_synthetic, load_split
build_synthetic(sys.argv[1], "tiny", num_per_task=1)
source = load_split(sys.argv[1], "shifted", "tiny_n1")
print("read", len(source), source[0]["uid"])
"""


def test_build_and_read_never_import_tensorflow_even_where_it_is_installed(tmp_path):
    import subprocess

    done = subprocess.run([sys.executable, "-c", _POISONED_TF, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "read " in done.stdout


# ---------------------------------------------------------------- user data: the `ops` field


def _user_jsonl(folder) -> str:
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(folder / "a.png")
    good = {"images": ["a.png"], "question": "How many dots?", "response": "I outline them <|Shape|>: 3. \\boxed{3}", "answer": "3"}
    lines = [dict(good, ops=["Line", "shape"], uid="with-ops"), dict(good, uid="without")]
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


def _ops_by_uid(data_dir: str) -> dict[str, tuple[str, ...]]:
    source = load_split(data_dir, "train", "mine", dataset="atlas_user_data")
    return {r["uid"]: decode_record(r, source.source, i).ops for i, r in enumerate(source)}


def test_user_data_stores_ops_and_rebuilds_a_build_stored_without_them(tmp_path, monkeypatch):
    path, data_dir = _user_jsonl(tmp_path), str(tmp_path / "tfds")
    # A build by the code before `ops` existed: no such feature, the old layout in its fingerprint.
    features = tfds_builder.record_features

    def old_features(imported=False):
        return tfds.features.FeaturesDict({k: v for k, v in features(imported).items() if k != "ops"})

    with monkeypatch.context() as m:
        m.setattr(tfds_builder, "record_features", old_features)
        m.setattr(tfds_builder, "_USER_LAYOUT", "origin")
        generate = tfds_builder.AtlasUserData._generate_examples
        m.setattr(tfds_builder.AtlasUserData, "_generate_examples",
                  lambda self, records: generate(self, ({k: v for k, v in r.items() if k != "ops"} for r in records)))
        dataset_dir, _ = tfds_builder.build_user_dataset(data_dir, {"train": path}, name="mine")
    assert "ops" not in load_split(data_dir, "train", "mine", dataset="atlas_user_data")[0]
    assert _ops_by_uid(data_dir) == {"with-ops": (), "without": ()}  # read as "names none", not an error

    # Today's code: the layout changed, so the same JSONL is imported again, with its ops.
    mtime = os.stat(os.path.join(dataset_dir, "dataset_info.json")).st_mtime_ns
    again, _ = tfds_builder.build_user_dataset(data_dir, {"train": path}, name="mine")
    assert again == dataset_dir and os.stat(os.path.join(dataset_dir, "dataset_info.json")).st_mtime_ns != mtime
    assert _ops_by_uid(data_dir) == {"with-ops": ("line", "shape"), "without": ()}
    stored = {r["uid"]: r["ops"] for r in load_split(data_dir, "train", "mine", dataset="atlas_user_data")}
    assert stored == {"with-ops": ["line", "shape"], "without": []}  # str, as the import wrote them

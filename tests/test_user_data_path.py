"""User data end to end: JSONL + image files -> `build_user_dataset` -> `load_split` ->
`make_dataset`. A sample that only the pipeline can reject (too long once tokenised) is reported
by its JSONL file and line, with the field that overflows; skip mode drops and counts it."""

import json
import logging
import re

import numpy as np
import pytest
from hf_tokenizer_fixture import make_tokenizer
from PIL import Image

from atlas_jax.data.image_processing import ImageProcessorConfig
from atlas_jax.data.pipeline import PipelineConfig, make_dataset
from atlas_jax.data.sample import BadRecordError
from atlas_jax.data.tfds_builder import build_user_dataset, load_split
from atlas_jax.model.config import ModelConfig, TextConfig, VisionConfig
from atlas_jax.tokenizer import RunTokens

MAX_LENGTH = 100
GOOD = {"question": "How many dots are inside the box?", "response": "I outline the box <|Shape|> and count 3. \\boxed{3}",
        "answer": "3", "images": ["dots.png"]}
LONG_QUESTION = dict(GOOD, question="Count the dots inside the box, then count them again. " * 12)
LONG_RESPONSE = dict(GOOD, response="I outline the box <|Shape|> " + "and I count the dots once more, " * 15 + "so 3. \\boxed{3}")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("user_data_tok"))


@pytest.fixture(scope="module")
def model_cfg(tok):
    # The pipeline only checks the vision patching and the image token ids against the model.
    ids = {f: tok.convert_tokens_to_ids(t) for f, t in (("image_token_id", "<|image_pad|>"),
                                                        ("vision_start_token_id", "<|vision_start|>"),
                                                        ("vision_end_token_id", "<|vision_end|>"))}
    return ModelConfig(vision=VisionConfig(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                                                fullatt_block_indexes=(0,), window_size=56),
                       text=TextConfig(vocab_size=1152, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4,
                                       num_kv_heads=2, mrope_section=(2, 3, 3)), **ids)


def _write(folder, name, lines):
    path = folder / name
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return str(path)


@pytest.fixture
def folder(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(tmp_path / "dots.png")
    return tmp_path


def _dataset(tok, model_cfg, source, **kw):
    kw = dict(batch_size=1, max_length=MAX_LENGTH, max_patches=64, image=ImageProcessorConfig(max_pixels=56 * 56 * 2),
              shuffle=False, num_epochs=1, read_threads=1) | kw
    cfg = PipelineConfig(**kw)
    return make_dataset(source, tok, RunTokens.of(tok), cfg, model_cfg, process_index=0, process_count=1)


def _first_bad_record(tok, model_cfg, data_dir, split) -> BadRecordError:
    source = load_split(data_dir, split, "e2e", dataset="atlas_user_data")
    with pytest.raises(BadRecordError) as info:
        list(iter(_dataset(tok, model_cfg, source)))
    return info.value


def test_too_long_sample_names_jsonl_line_and_field(tok, model_cfg, folder):
    train = _write(folder, "train.jsonl", [GOOD, LONG_QUESTION])
    test = _write(folder, "test.jsonl", [dict(LONG_RESPONSE, uid="q-long"), dict(GOOD, uid="fine")])
    data_dir = str(folder / "tfds")
    build_user_dataset(data_dir, {"train": train, "test": test}, name="e2e")

    err = _first_bad_record(tok, model_cfg, data_dir, "train")
    assert (err.source, err.field) == (train, "question")
    assert re.fullmatch(r"line 2 \(stored as atlas_user_data/e2e:train record [01]\)", err.record), err.record
    assert re.match(r"too long: the prompt alone is \d+ tokens \(question \d+, images \d+, chat template \d+\) > max_length=100; "
                    r"the question may have at most \d+ tokens$", err.problem), err.problem
    assert str(err).startswith(f"{train}, record line 2 (")

    err = _first_bad_record(tok, model_cfg, data_dir, "test")
    assert (err.source, err.field) == (test, "response")
    # A uid the user chose is shown beside the line (the default one would only repeat it).
    assert re.fullmatch(r"line 1 \(uid 'q-long'; stored as atlas_user_data/e2e:test record [01]\)", err.record), err.record
    prompt, response = map(int, re.match(r"too long: \d+ tokens = prompt (\d+) \+ response (\d+) > max_length=100", err.problem).groups())
    assert prompt <= MAX_LENGTH < prompt + response, err.problem


def test_skip_mode_counts_too_long_samples(tok, model_cfg, folder, caplog):
    lines = [GOOD, LONG_QUESTION, dict(GOOD, question="How many dots are there?"), LONG_RESPONSE, dict(GOOD, answer="3 ")]
    train = _write(folder, "train.jsonl", lines)
    data_dir = str(folder / "tfds")
    _, reports = build_user_dataset(data_dir, {"train": train}, name="skip")
    assert reports["train"].num_records == 5  # valid records: only the tokenised length is wrong
    source = load_split(data_dir, "train", "skip", dataset="atlas_user_data")

    with caplog.at_level(logging.WARNING):
        it = iter(_dataset(tok, model_cfg, source, skip_bad_records=True, num_epochs=2))
        uids = [u for batch in it for u in batch["uid"]]
    assert sorted(uids) == sorted(["train.jsonl:1", "train.jsonl:3", "train.jsonl:5"] * 2)
    # A skip is counted with the next good record's batch: all of the first epoch's, and those of
    # the second epoch that come before its last good record (the store decides the order).
    order = [r["uid"] for r in source]
    last_good = max(order.index(u) for u in uids)
    bad = ("train.jsonl:2", "train.jsonl:4")
    assert it.num_skipped == 2 + sum(order.index(u) < last_good for u in bad), (order, it.num_skipped)
    # Every skip is logged, naming the JSONL line and the field.
    skipped = sorted(re.findall(r"skipping bad record: \S+, record line (\d) \(.*?\), field '(\w+)'", caplog.text))
    assert skipped == [("2", "question"), ("2", "question"), ("4", "response"), ("4", "response")], caplog.text

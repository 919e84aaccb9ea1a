"""The Grain input pipeline against transformers (tokens, masks, pixels, M-RoPE positions) and
its contract: exact resume, disjoint covering host shards, bad records, seeded epochs, global arrays.

References nobody here wrote: `Qwen2_5_VLProcessor` (HF chat template rendering + image processor
+ tokenizer) and `Qwen2_5_VLModel.get_rope_index`. The processor is built image-only: its
constructor insists on a video processor, which needs torchvision (absent on purpose).
"""

import dataclasses
import re

import jax
import numpy as np
import pytest
import torch
from etils import epath
from hf_tokenizer_fixture import make_tokenizer
from PIL import Image
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel, Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil

import grain
from atlas_jax import sharding
from atlas_jax.data import batching, records
from atlas_jax.data.image_processing import ImageProcessorConfig
from atlas_jax.data.pipeline import (
    PipelineConfig,
    make_dataset,
    pipeline_state,
    restore,
    to_global,
)
from atlas_jax.data.sample import BadRecordError, Sample
from atlas_jax.data.synthetic import generate_split
from atlas_jax.functional_tokens import token_strings
from atlas_jax.tokenizer import RunTokens
from atlas_jax.model.config import ConfigError, ModelConfig, TextConfig, VisionConfig

IMG = ImageProcessorConfig(max_pixels=56 * 56 * 2)  # <= 32 patches per image: tiny and fast
FUNCTIONAL = token_strings()


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("pipeline_tok"))


def ids_of(tok):
    return {s: tok.convert_tokens_to_ids(s) for s in ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>")}


@pytest.fixture(scope="module")
def model_cfg(tok):
    ids = ids_of(tok)
    return ModelConfig(
        vision=VisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                            fullatt_block_indexes=(1,), window_size=56),
        text=TextConfig(vocab_size=1152, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                        num_kv_heads=2, mrope_section=(2, 3, 3)),
        image_token_id=ids["<|image_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )


@pytest.fixture(scope="module")
def hf_model(tok):
    """A tiny random HF Qwen2.5-VL model, only for its `get_rope_index`."""
    ids = ids_of(tok)
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=1152, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    return Qwen2_5_VLModel(cfg).eval()


class _ImageOnlyProcessor(Qwen2_5_VLProcessor):
    def check_argument_for_proper_class(self, name, arg):
        if name == "video_processor" and arg is None:
            return None
        return super().check_argument_for_proper_class(name, arg)


@pytest.fixture(scope="module")
def hf_processor(tok):
    image_processor = Qwen2VLImageProcessorPil(min_pixels=IMG.min_pixels, max_pixels=IMG.max_pixels)
    return _ImageOnlyProcessor(image_processor=image_processor, tokenizer=tok, video_processor=None,
                               chat_template=tok.chat_template)


def random_sample(i: int, n_images: int = 1, seed: int = 0) -> Sample:
    rng = np.random.default_rng(seed * 1000 + i)
    images = [
        Image.fromarray(rng.integers(0, 256, (int(rng.integers(20, 90)), int(rng.integers(20, 90)), 3), np.uint8))
        for _ in range(n_images)
    ]
    return Sample(
        images=images,
        question=f"How many circles are inside the region {i}?" + " Look closely." * int(rng.integers(0, 4)),
        response=f"I outline the region. <|Shape|> Now I label each one <|Text|> and count. \\boxed{{{i}}}",
        answer=str(i),
        task="shape_count",
        response_answer_only=f"\\boxed{{{i}}}",
        uid=f"s{i}",
    )


def config(**kw) -> PipelineConfig:
    base = dict(batch_size=2, max_length=256, max_patches=64, max_images=2, image=IMG, seed=3, read_threads=1)
    base.update(kw)
    return PipelineConfig(**base)


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], np.ndarray):
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        else:
            assert a[k] == b[k], k


def messages(sample: Sample, with_response: bool):
    user = {"role": "user", "content": [{"type": "image"} for _ in sample.images] + [{"type": "text", "text": sample.question}]}
    return [user, {"role": "assistant", "content": sample.response}] if with_response else [user]


def hf_encode(proc, sample, with_response):
    text = proc.apply_chat_template(messages(sample, with_response), tokenize=False, add_generation_prompt=not with_response)
    return proc(text=[text], images=sample.images, return_tensors="np")


def hf_positions(hf_model, batch):
    """transformers' M-RoPE ids in our layout int[B, 3, T] (HF returns [3, B, T])."""
    ids = torch.from_numpy(batch["input_ids"]).long()
    n = batch["num_images"]
    grids = torch.from_numpy(np.concatenate([batch["grid_thw"][i, : n[i]] for i in range(len(n))])).long()
    ref, _ = hf_model.get_rope_index(
        ids, mm_token_type_ids=(ids == hf_model.config.image_token_id).int(), image_grid_thw=grids,
        attention_mask=torch.from_numpy(batch["attention_mask"]).long(),
    )
    return ref.numpy().transpose(1, 0, 2)


# ----------------------------------------------------------------------------- vs transformers
def test_sft_batch_matches_hf_processor_and_rope_index(tok, model_cfg, hf_processor, hf_model):
    samples = list(generate_split("train", 1, seed=0, tasks=["shape_count", "line_side"], image_size=112))
    samples.append(random_sample(7, n_images=2))
    ds = make_dataset(samples, tok, RunTokens.of(tok), config(batch_size=3, shuffle=False, num_epochs=1), model_cfg, source_name="mem")
    (batch,) = list(iter(ds))
    functional_ids = [tok.convert_tokens_to_ids(s) for s in FUNCTIONAL]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    for i, sample in enumerate(samples):
        ref = hf_encode(hf_processor, sample, with_response=True)
        ref_ids = ref["input_ids"][0]
        n = len(ref_ids)
        ids = batch["input_ids"][i]
        np.testing.assert_array_equal(ids[:n], ref_ids)
        assert batch["attention_mask"][i].sum() == n and batch["attention_mask"][i, :n].all()
        assert (ids[n:] == tok.pad_token_id).all()
        # Pixels and grids equal the processor's, then zero rows.
        rows = ref["pixel_values"].shape[0]
        np.testing.assert_allclose(batch["pixel_values"][i, :rows], ref["pixel_values"], atol=1e-5)
        assert not batch["pixel_values"][i, rows:].any()
        k = len(sample.images)
        np.testing.assert_array_equal(batch["grid_thw"][i, :k], ref["image_grid_thw"])
        assert batch["num_images"][i] == k and not batch["grid_thw"][i, k:].any()
        # Loss mask: exactly the tokens after HF's generation prompt, through <|im_end|> (not the final "\n").
        prompt = hf_encode(hf_processor, sample, with_response=False)["input_ids"][0]
        np.testing.assert_array_equal(ref_ids[: len(prompt)], prompt)
        assert ref_ids[n - 2] == im_end
        expected_loss = np.zeros(len(ids), bool)
        expected_loss[len(prompt) : n - 1] = True
        np.testing.assert_array_equal(batch["loss_mask"][i], expected_loss)
        assert batch["prompt_len"][i] == len(prompt)
        # Functional tokens: single ids, one per occurrence in the response, all marked and trained on.
        fpos = np.flatnonzero(batch["functional_mask"][i])
        assert len(fpos) == sum(sample.response.count(s) for s in FUNCTIONAL) >= 1
        np.testing.assert_array_equal(fpos, np.flatnonzero(np.isin(ref_ids, functional_ids)))
        in_order = re.findall("|".join(map(re.escape, FUNCTIONAL)), sample.response)
        assert [tok.convert_ids_to_tokens(int(t)) for t in ids[fpos]] == in_order
        assert batch["loss_mask"][i, fpos].all()
    np.testing.assert_array_equal(batch["positions"], hf_positions(hf_model, batch))


def test_rl_batch_is_left_padded_prompt(tok, model_cfg, hf_processor, hf_model):
    samples = [random_sample(i, n_images=1 + i % 2) for i in range(3)]
    ds = make_dataset(samples, tok, RunTokens.of(tok), config(batch_size=3, shuffle=False, num_epochs=1, format="rl"), model_cfg)
    (batch,) = list(iter(ds))
    assert "loss_mask" not in batch and "functional_mask" not in batch
    t = batch["input_ids"].shape[1]
    for i, sample in enumerate(samples):
        ref_ids = hf_encode(hf_processor, sample, with_response=False)["input_ids"][0]
        n = len(ref_ids)
        np.testing.assert_array_equal(batch["input_ids"][i, t - n :], ref_ids)
        assert (batch["input_ids"][i, : t - n] == tok.pad_token_id).all()
        np.testing.assert_array_equal(batch["attention_mask"][i], np.arange(t) >= t - n)
        assert batch["prompt_len"][i] == n
    np.testing.assert_array_equal(batch["positions"], hf_positions(hf_model, batch))
    assert batch["answer"] == ["0", "1", "2"] and batch["uid"] == ["s0", "s1", "s2"]
    assert batch["task"] == ["shape_count"] * 3


def test_answer_only_target_and_record_dicts(tok, model_cfg):
    samples = [random_sample(i) for i in range(2)]
    as_records = [records.encode_sample(s) for s in samples]
    cfg = config(shuffle=False, num_epochs=1, sft_target="answer_only")
    from_samples = next(iter(make_dataset(samples, tok, RunTokens.of(tok), cfg, model_cfg)))
    from_records = next(iter(make_dataset(as_records, tok, RunTokens.of(tok), cfg, model_cfg)))
    assert_batches_equal(from_samples, from_records)  # PNG round trip is lossless
    assert not from_samples["functional_mask"].any()
    target = tok.decode(from_samples["input_ids"][0][from_samples["loss_mask"][0]])
    assert target == "\\boxed{0}<|im_end|>"


def test_mixed_target_picks_each_records_response_from_its_uid(tok, model_cfg):
    samples = [random_sample(i) for i in range(8)]

    def targets(source, **kw):
        cfg = config(batch_size=len(source), shuffle=False, num_epochs=1, **kw)
        batch = next(iter(make_dataset(source, tok, RunTokens.of(tok), cfg, model_cfg)))
        return {u: tok.decode(ids[mask]) for u, ids, mask in zip(batch["uid"], batch["input_ids"], batch["loss_mask"])}

    trajectory, answer_only = targets(samples), targets(samples, sft_target="answer_only")
    assert targets(samples, sft_target="mixed", answer_only_share=0.0) == trajectory
    assert targets(samples, sft_target="mixed", answer_only_share=1.0) == answer_only
    mixed = targets(samples, sft_target="mixed", answer_only_share=0.5)
    picked = {u: mixed[u] == answer_only[u] for u in mixed}
    assert all(mixed[u] == (answer_only if picked[u] else trajectory)[u] for u in mixed)
    assert 0 < sum(picked.values()) < len(samples)  # both kinds among 8 records (the draw below is fixed)
    assert picked == {s.uid: batching.answer_only_target(s, 0.5) for s in samples}
    # A function of the record alone: the same choice in another order and among other records.
    assert targets(samples[::-1][:5], sft_target="mixed", answer_only_share=0.5) == {u: mixed[u] for u in ("s7", "s6", "s5", "s4", "s3")}
    # The draw is uniform: the share of 4000 uids below 0.3 within 4 binomial standard deviations.
    share = np.mean([batching.answer_only_target(dataclasses.replace(samples[0], uid=f"train/zoom_color/{i}"), 0.3) for i in range(4000)])
    assert abs(share - 0.3) < 4 * np.sqrt(0.3 * 0.7 / 4000)
    with pytest.raises(ConfigError, match=r"data\.answer_only_share=1\.5: expected a fraction in \[0, 1\]"):
        config(sft_target="mixed", answer_only_share=1.5)


def test_tfds_array_record_source(tok, model_cfg, tmp_path):
    from atlas_jax.data import tfds_builder

    tfds_builder.build_synthetic(str(tmp_path), "tiny", num_per_task=1, image_size=112)
    source = tfds_builder.load_split(str(tmp_path), "train", tfds_builder.synthetic_config_name("tiny", num_per_task=1, image_size=112))
    samples = list(generate_split("train", 1, seed=0, image_size=112))
    assert len(source) == len(samples)
    cfg = config(batch_size=len(samples), shuffle=False, num_epochs=1)
    stored = next(iter(make_dataset(source, tok, RunTokens.of(tok), cfg, model_cfg)))
    direct = next(iter(make_dataset(samples, tok, RunTokens.of(tok), cfg, model_cfg)))
    row = {u: i for i, u in enumerate(direct["uid"])}
    order = [row[u] for u in stored["uid"]]  # the store may hold the records in another order
    for key, x in direct.items():
        if isinstance(x, np.ndarray):
            np.testing.assert_array_equal(stored[key], x[order], err_msg=key)
    with pytest.raises(BadRecordError, match=r"^atlas_synthetic/tiny_n1_s112:train, record \d+"):
        next(iter(make_dataset(source, tok, RunTokens.of(tok), config(max_length=20), model_cfg)))


def test_length_buckets(tok, model_cfg):
    samples = [random_sample(i) for i in range(4)]
    longest = 0
    for b in iter(make_dataset(samples, tok, RunTokens.of(tok), config(num_epochs=1, pad_to_multiple=64), model_cfg)):
        t = b["input_ids"].shape[1]
        n = int(b["attention_mask"].sum(1).max())
        assert t % 64 == 0 and n <= t < n + 64 and b["positions"].shape == (2, 3, t)
        longest = max(longest, n)
    fixed = next(iter(make_dataset(samples, tok, RunTokens.of(tok), config(num_epochs=1, pad_to_multiple=0), model_cfg)))
    assert fixed["input_ids"].shape == (2, 256)


# ----------------------------------------------------------------------------- resume
def test_exact_resume_including_skip_count(tok, model_cfg, tmp_path):
    samples = [random_sample(i) for i in range(7)]
    samples[4] = Sample(images=[Image.new("RGB", (500, 2))], question="q", response="\\boxed{1}", answer="1", uid="bad")
    cfg = config(batch_size=4, skip_bad_records=True)  # 6 good records per epoch: batches straddle epochs
    full = take(iter(make_dataset(samples, tok, RunTokens.of(tok), cfg, model_cfg)), 7)

    it = iter(make_dataset(samples, tok, RunTokens.of(tok), cfg, model_cfg))
    take(it, 3)
    state = pipeline_state(it)
    skipped_at_save = it.num_skipped
    assert skipped_at_save >= 1
    resumed = restore(iter(make_dataset(samples, tok, RunTokens.of(tok), cfg, model_cfg)), state)
    assert resumed.num_skipped == skipped_at_save
    for a, b in zip(full[3:], take(resumed, 4)):
        assert_batches_equal(a, b)

    # The same through grain's Orbax checkpoint handler (what the trainer stores).
    handler = grain.checkpoint.CheckpointHandler()
    it = iter(make_dataset(samples, tok, RunTokens.of(tok), cfg, model_cfg))
    take(it, 5)
    handler.save(epath.Path(tmp_path), args=grain.checkpoint.CheckpointSave(it))
    resumed = handler.restore(epath.Path(tmp_path), args=grain.checkpoint.CheckpointRestore(iter(make_dataset(samples, tok, RunTokens.of(tok), cfg, model_cfg))))
    for a, b in zip(full[5:], take(resumed, 2)):
        assert_batches_equal(a, b)


@pytest.mark.slow
def test_exact_resume_with_worker_processes(tok, model_cfg):
    samples = [random_sample(i) for i in range(5)]
    cfg = config(worker_count=1)
    reference = take(iter(make_dataset(samples, tok, RunTokens.of(tok), config(), model_cfg)), 5)
    it = iter(make_dataset(samples, tok, RunTokens.of(tok), cfg, model_cfg))
    try:
        got = take(it, 2)
        state = pipeline_state(it)
    finally:
        it.close()
    resumed = restore(iter(make_dataset(samples, tok, RunTokens.of(tok), cfg, model_cfg)), state)
    try:
        got += take(resumed, 3)
    finally:
        resumed.close()
    for a, b in zip(reference, got):  # processes give the same batches as threads
        assert_batches_equal(a, b)


# ----------------------------------------------------------------------------- hosts, epochs
@pytest.mark.parametrize("hosts", [2, 3])
def test_per_host_streams_disjoint_and_covering(tok, model_cfg, hosts):
    samples = [random_sample(i) for i in range(10)]
    cfg = config(batch_size=hosts, num_epochs=1)  # one example per host per step
    streams = []
    for p in range(hosts):
        ds = make_dataset(samples, tok, RunTokens.of(tok), cfg, model_cfg, process_index=p, process_count=hosts)
        streams.append([u for b in iter(ds) for u in b["uid"]])
    assert len({len(s) for s in streams}) == 1  # every host takes the same number of steps
    sets = [set(s) for s in streams]
    assert set().union(*sets) == {s.uid for s in samples}
    n_topup = (-len(samples)) % hosts  # the stream's first records, repeated so hosts stay equal
    assert sum(len(s) for s in sets) == len(samples) + n_topup
    assert sum(len(s) for s in streams) == len(samples) + n_topup


def test_global_batches_hold_the_same_records_in_the_same_order_for_any_number_of_hosts(tok, model_cfg):
    samples = [random_sample(i) for i in range(12)]
    cfg = config(batch_size=6, num_epochs=2, seed=3)

    def global_batches(hosts):
        """Each global batch's uids: host 0's block, then host 1's, ... (`to_global`'s rows)."""
        its = [iter(make_dataset(samples, tok, RunTokens.of(tok), cfg, model_cfg, process_index=p, process_count=hosts)) for p in range(hosts)]
        return [[u for it in its for u in next(it)["uid"]] for _ in range(4)]

    one = global_batches(1)
    assert global_batches(2) == one and global_batches(3) == one
    assert all(len(set(b)) == len(b) for b in one)  # the hosts' shares of a batch are disjoint
    assert len({tuple(b) for b in one}) == 4


def test_epochs_and_shuffle_deterministic(tok, model_cfg):
    samples = [random_sample(i) for i in range(6)]

    def uids(**kw):
        return [u for b in iter(make_dataset(samples, tok, RunTokens.of(tok), config(num_epochs=3, **kw), model_cfg)) for u in b["uid"]]

    a = uids(seed=1)
    assert a == uids(seed=1)
    assert a != uids(seed=2)
    epochs = [a[6 * e : 6 * e + 6] for e in range(3)]
    assert all(sorted(e) == sorted(s.uid for s in samples) for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1  # re-shuffled each epoch
    assert uids(shuffle=False) == [s.uid for s in samples] * 3


# ----------------------------------------------------------------------------- bad records
def _truncated_png_record():
    rec = records.encode_sample(random_sample(0))
    rec["images"] = [rec["images"][0][:60]]
    return rec


def _no_response_record():
    rec = records.encode_sample(random_sample(0))
    del rec["response"]
    return rec


def _two_images():
    return random_sample(0, n_images=2)


def _elongated():
    s = random_sample(0)
    s.images = [Image.new("RGB", (402, 2))]
    return s


def _big_image():
    s = random_sample(0)
    s.images = [Image.new("RGB", (300, 300))]
    return s


def _long_question():
    s = random_sample(0)
    s.question = "Count the circles. " * 40
    return s


def _long_response():
    s = random_sample(0)
    s.response = "I outline the region. <|Shape|> " + "Then I count them again. " * 40 + "\\boxed{0}"
    return s


def _functional_in_question():
    s = random_sample(0)
    s.question = "What does <|Line|> do?"
    return s


def _no_answer_only():
    s = random_sample(0)
    s.response_answer_only = ""
    return s


BAD_CASES = [
    ("truncated image", _truncated_png_record, {}, "images[0]"),
    ("missing field", _no_response_record, {}, "response"),
    ("too many images", _two_images, {"max_images": 1}, "images"),
    ("too elongated", _elongated, {}, "images[0]"),
    ("too many patches", _big_image, {"image": ImageProcessorConfig()}, "images"),
    ("question too long", _long_question, {"max_length": 100}, "question"),
    ("response too long", _long_response, {"max_length": 100}, "response"),
    ("functional token in question", _functional_in_question, {}, "question"),
    ("empty answer-only target", _no_answer_only, {"sft_target": "answer_only"}, "response_answer_only"),
]


@pytest.mark.parametrize("name,make_bad,overrides,field", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_record_raises_naming_it(tok, model_cfg, name, make_bad, overrides, field):
    data = [random_sample(0), random_sample(1), make_bad(), random_sample(3)]
    ds = make_dataset(data, tok, RunTokens.of(tok), config(batch_size=1, shuffle=False, num_epochs=1, **overrides), model_cfg,
                      source_name="user.jsonl")
    with pytest.raises(BadRecordError) as info:
        list(iter(ds))
    assert str(info.value).startswith("user.jsonl, record 2")
    assert info.value.field == field, str(info.value)


def test_skip_mode_counts_and_continues(tok, model_cfg):
    bad = [c[1]() for c in BAD_CASES[:4]] + [_long_question(), _functional_in_question()]
    good = [random_sample(i) for i in range(10, 14)]
    data = [good[0], bad[0], bad[1], good[1], bad[2], bad[3], good[2], bad[4], bad[5], good[3]]
    ds = make_dataset(data, tok, RunTokens.of(tok), config(batch_size=1, shuffle=False, num_epochs=1, max_images=1, max_length=100,
                                        skip_bad_records=True), model_cfg)
    it = iter(ds)
    batches = list(it)
    assert [b["uid"][0] for b in batches] == [s.uid for s in good]
    assert [b["skipped"] for b in batches] == [0, 2, 2, 2]
    assert it.num_skipped == len(bad)


@pytest.mark.parametrize("num_epochs", [None, 1])
def test_skip_mode_stops_when_every_record_is_bad(tok, model_cfg, num_epochs):
    """max_length below every sample's image tokens: skipping would read forever (or yield nothing)."""
    data = [random_sample(i) for i in range(3)]
    ds = make_dataset(data, tok, RunTokens.of(tok), config(batch_size=1, max_length=20, skip_bad_records=True, num_epochs=num_epochs),
                      model_cfg, source_name="user.jsonl")
    with pytest.raises(ConfigError, match=r"every record of user.jsonl is skipped .* the last 3 read, as many as it "
                                          r"holds, were all bad; the first because: user.jsonl, record \d .*field 'images': too long"):
        next(iter(ds))


# ----------------------------------------------------------------------------- devices + config
def test_global_batches_on_a_mesh(tok, model_cfg):
    mesh = sharding.make_mesh((4, 2, 1))
    samples = [random_sample(i) for i in range(8)]
    ds = make_dataset(samples, tok, RunTokens.of(tok), config(batch_size=8, num_epochs=1), model_cfg)
    host = next(iter(ds))
    it = iter(ds)
    batch = to_global(next(it), mesh)
    assert it.get_state() == _advanced(ds, 1).get_state()  # nothing read ahead
    for key, x in host.items():
        if isinstance(x, np.ndarray):
            assert isinstance(batch[key], jax.Array) and batch[key].shape == x.shape
            np.testing.assert_array_equal(np.asarray(batch[key]), x)
            assert batch[key].sharding.spec[0] == ("data", "fsdp"), key
            assert len(batch[key].addressable_shards) == 8
        else:
            assert batch[key] == x
    with pytest.raises(ConfigError, match="not divisible"):
        to_global(next(iter(make_dataset(samples, tok, RunTokens.of(tok), config(batch_size=4), model_cfg))), mesh)


def _advanced(ds, n):
    it = iter(ds)
    take(it, n)
    return it


def test_config_errors(tok, model_cfg):
    with pytest.raises(ConfigError, match="image_token_id"):
        make_dataset([random_sample(0)], tok, RunTokens.of(tok), config(), model_cfg.replace(image_token_id=5))
    with pytest.raises(ConfigError, match="batch_size=3 is not divisible by process_count=2"):
        make_dataset([random_sample(0)], tok, RunTokens.of(tok), config(batch_size=3), model_cfg, process_index=0, process_count=2)
    with pytest.raises(ConfigError, match="max_patches"):
        config(max_patches=30)
    with pytest.raises(ConfigError, match="format"):
        config(format="dpo")

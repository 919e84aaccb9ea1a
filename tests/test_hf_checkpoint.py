"""Hugging Face interop: exact round trip, functional-token rows, and clear errors for bad checkpoints."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from atlas_jax import hf_checkpoint, sharding
from atlas_jax.model import extend
from atlas_jax.safetensors_io import SafetensorsFile, save_file
from hf_model_fixture import example, hf_logits, jax_batch, make_hf_checkpoint
from hf_tokenizer_fixture import make_tokenizer

MESH = None


def _mesh():
    return sharding.make_mesh((1, 1, 1), jax.devices()[:1])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("hf_src"))
    make_hf_checkpoint(path, seed=2)
    return path


def _tensors(path):
    return {k: np.asarray(v) for k, v in SafetensorsFile(os.path.join(path, "model.safetensors")).items()}


def test_round_trip_reproduces_every_tensor_exactly(ckpt, tmp_path):
    model = hf_checkpoint.from_hf(ckpt, mesh=sharding.make_mesh((2, 2, 2)))
    out = str(tmp_path / "exported")
    hf_checkpoint.to_hf(model, out)
    a, b = _tensors(ckpt), _tensors(out)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k
    assert not os.path.exists(os.path.join(out, hf_checkpoint.VISUAL_OPS_FILE))


def test_bfloat16_checkpoint_loads_and_round_trips(ckpt, tmp_path):
    src = str(tmp_path / "bf16")
    shutil.copytree(ckpt, src)
    import ml_dtypes

    t = {k: v.astype(ml_dtypes.bfloat16) for k, v in _tensors(ckpt).items()}
    save_file(t, os.path.join(src, "model.safetensors"))
    model = hf_checkpoint.from_hf(src, mesh=_mesh(), param_dtype="bfloat16", dtype="bfloat16")
    assert model.embed.embedding[...].dtype == jnp.bfloat16
    out = str(tmp_path / "bf16_out")
    hf_checkpoint.to_hf(model, out)
    b = _tensors(out)
    for k in t:
        assert t[k].tobytes() == b[k].tobytes(), k


@pytest.mark.parametrize("spare_rows", [True, False])
def test_functional_rows_keep_transformers_parity(tmp_path, spare_rows):
    tok = make_tokenizer(tmp_path / "tok", functional=False)
    n = len(tok)
    vocab = n + 16 if spare_rows else n
    ids = tuple(tok.convert_tokens_to_ids(s) for s in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"))
    src = str(tmp_path / "base")
    make_hf_checkpoint(src, seed=3, vocab=vocab, ids=ids)
    base = hf_checkpoint.from_hf(src, mesh=_mesh())
    model = extend.add_functional_tokens(base, tok, layer=1, num_heads=2, head_dim=16)
    func = model.cfg.visual_ops.token_ids
    assert len(func) == 5 and all(len(tok.encode(tok.convert_ids_to_tokens(i), add_special_tokens=False)) == 1 for i in func)
    V = model.cfg.text.vocab_size
    assert V == (vocab if spare_rows else -(-(n + 5) // 128) * 128)

    # New rows are the mean of the descriptive words' rows; old rows unchanged.
    emb = np.asarray(model.embed.embedding[...])
    old = np.asarray(base.embed.embedding[...])
    line = func[1]
    words = [i for w in ("line", "draw", "segment") for f in (w, " " + w) for i in tok.encode(f, add_special_tokens=False)]
    np.testing.assert_allclose(emb[line], old[sorted(set(words))].mean(0), atol=1e-6)
    np.testing.assert_array_equal(emb[:n], old[:n])

    out = str(tmp_path / "exported")
    hf_checkpoint.to_hf(model, out, tokenizer=tok)
    assert os.path.exists(os.path.join(out, hf_checkpoint.VISUAL_OPS_FILE))
    ref = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, attn_implementation="eager").eval()
    assert ref.config.text_config.vocab_size == V

    rng = np.random.default_rng(0)
    e = example(rng, 4, [(1, 4, 6)], 3, image_ids=(ids[0], ids[2], ids[3]))
    e.ids += [func[1], 9, 10, func[3], func[4], 11, func[0], func[2]]
    batch = jax_batch([e], model.cfg, pad_left=False)
    got, _, _ = model(
        *(jnp.asarray(batch[k]) for k in ("input_ids", "positions", "attention_mask")),
        pixel_values=jnp.asarray(batch["pixel_values"]),
        vision={k: jnp.asarray(v) for k, v in batch["vision"].items()},
    )
    np.testing.assert_allclose(np.asarray(got)[0], hf_logits(ref, e), atol=1e-4, rtol=0)

    # The visual-op modules (config in the file's metadata, weights) come back from their own file.
    again = hf_checkpoint.from_hf(out, mesh=_mesh())
    assert again.cfg.visual_ops == model.cfg.visual_ops
    np.testing.assert_array_equal(np.asarray(again.visual_ops.wq[...]), np.asarray(model.visual_ops.wq[...]))


# ---------------------------------------------------------------------- bad checkpoints
def _copy(ckpt, tmp_path):
    dst = str(tmp_path / "bad")
    shutil.copytree(ckpt, dst)
    return dst


def _edit_config(path, **kw):
    p = os.path.join(path, "config.json")
    d = json.load(open(p))
    d.update(kw)
    json.dump(d, open(p, "w"))


def _raises(path, *fragments):
    with pytest.raises(hf_checkpoint.CheckpointError) as e:
        hf_checkpoint.from_hf(path, mesh=_mesh())
    for f in fragments:
        assert f in str(e.value), str(e.value)


def test_missing_directory_and_files(ckpt, tmp_path):
    _raises(str(tmp_path / "nope"), "does not exist")
    d = _copy(ckpt, tmp_path)
    os.remove(os.path.join(d, "model.safetensors"))
    _raises(d, "model.safetensors")
    os.remove(os.path.join(d, "config.json"))
    _raises(d, "config.json", "missing")


def test_wrong_model_type(ckpt, tmp_path):
    d = _copy(ckpt, tmp_path)
    _edit_config(d, model_type="llava")
    _raises(d, "config.json", "model_type='llava'", "qwen2_5_vl")


def test_shape_mismatch(ckpt, tmp_path):
    d = _copy(ckpt, tmp_path)
    t = _tensors(d)
    t["model.layers.1.mlp.up_proj.weight"] = t["model.layers.1.mlp.up_proj.weight"][:-1]
    save_file(t, os.path.join(d, "model.safetensors"))
    _raises(d, "model.safetensors", "model.layers.1.mlp.up_proj.weight", "shape")


def test_dtype_mismatch(ckpt, tmp_path):
    d = _copy(ckpt, tmp_path)
    t = _tensors(d)
    t["model.norm.weight"] = t["model.norm.weight"].astype(np.int32)
    save_file(t, os.path.join(d, "model.safetensors"))
    _raises(d, "model.norm.weight", "int32", "floating")


def test_missing_tensor(ckpt, tmp_path):
    d = _copy(ckpt, tmp_path)
    t = _tensors(d)
    del t["visual.merger.mlp.2.bias"]
    save_file(t, os.path.join(d, "model.safetensors"))
    _raises(d, "visual.merger.mlp.2.bias")


def test_truncated_weights_file(ckpt, tmp_path):
    d = _copy(ckpt, tmp_path)
    p = os.path.join(d, "model.safetensors")
    data = open(p, "rb").read()
    open(p, "wb").write(data[: len(data) // 2])
    _raises(d, "model.safetensors", "truncated")


def test_pickle_only_checkpoint_is_never_unpickled(ckpt, tmp_path):
    d = _copy(ckpt, tmp_path)
    os.remove(os.path.join(d, "model.safetensors"))
    # A pickle that would run code if it were ever loaded.
    marker = tmp_path / "pwned"
    import pickle

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with open(os.path.join(d, "pytorch_model.bin"), "wb") as f:
        pickle.dump(Evil(), f)
    _raises(d, "pytorch_model.bin", "never unpickled")
    assert not marker.exists()


def _shard(ckpt, tmp_path):
    d = _copy(ckpt, tmp_path)
    t = _tensors(d)
    os.remove(os.path.join(d, "model.safetensors"))
    names = sorted(t)
    half = len(names) // 2
    parts = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    wm = {}
    for fname, ns in parts.items():
        save_file({n: t[n] for n in ns}, os.path.join(d, fname))
        wm.update({n: fname for n in ns})
    json.dump({"metadata": {}, "weight_map": wm}, open(os.path.join(d, "model.safetensors.index.json"), "w"))
    return d, wm


def test_sharded_checkpoint_loads(ckpt, tmp_path):
    d, _ = _shard(ckpt, tmp_path)
    a = hf_checkpoint.from_hf(d, mesh=_mesh())
    b = hf_checkpoint.from_hf(ckpt, mesh=_mesh())
    np.testing.assert_array_equal(np.asarray(a.layers[2].attn.q_proj.kernel[...]), np.asarray(b.layers[2].attn.q_proj.kernel[...]))


def test_incomplete_shard_index(ckpt, tmp_path):
    d, wm = _shard(ckpt, tmp_path)
    os.remove(os.path.join(d, "model-00002-of-00002.safetensors"))
    _raises(d, "incomplete shard index", "model-00002-of-00002.safetensors")
    d2, wm = _shard(ckpt, tmp_path / "x")
    index = os.path.join(d2, "model.safetensors.index.json")
    wm2 = dict(wm)
    wm2.pop("model.norm.weight")
    json.dump({"weight_map": wm2}, open(index, "w"))
    _raises(d2, "model.norm.weight")

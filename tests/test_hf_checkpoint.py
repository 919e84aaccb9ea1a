"""Hugging Face interop: exact round trip, functional-token rows, and clear errors for bad checkpoints."""

import dataclasses
import json
import mmap
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import Qwen2_5_VLForConditionalGeneration

from atlas_jax import hf_checkpoint, sharding
from atlas_jax.functional_tokens import DEFAULT_TOKENS
from atlas_jax.model import extend
from atlas_jax.model.config import VisualOpConfig
from atlas_jax.safetensors_io import SafetensorsFile, save_file
from hf_model_fixture import assert_logits_match, ckpt, example, make_hf_checkpoint, one_device_mesh  # noqa: F401 (ckpt: a fixture)
from hf_tokenizer_fixture import make_tokenizer



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
    model = hf_checkpoint.from_hf(src, mesh=one_device_mesh(), param_dtype="bfloat16", dtype="bfloat16")
    assert model.embed.embedding[...].dtype == jnp.bfloat16
    out = str(tmp_path / "bf16_out")
    hf_checkpoint.to_hf(model, out)
    b = _tensors(out)
    for k in t:
        assert t[k].tobytes() == b[k].tobytes(), k


# ---------------------------------------------------------------------- functional-token rows
@dataclasses.dataclass
class Extended:
    """A tiny HF checkpoint (`base_torch`, at `src`) extended with the five functional tokens (`model`,
    gates at zero), exported to `out` and loaded back by transformers (`ref`)."""

    tok: object
    n: int  # tokenizer entries before the functional tokens
    src: str
    out: str
    base_torch: object
    model: object
    ref: object
    spare_rows: bool
    tie: bool


@pytest.fixture(
    scope="module",
    params=[(True, False), (False, False), (False, True)],
    ids=["spare_rows", "grown", "grown_tied"],
)
def extended(request, tmp_path_factory):
    spare_rows, tie = request.param
    tmp = tmp_path_factory.mktemp("functional")
    tok = make_tokenizer(tmp / "tok", functional=False)
    n = len(tok)
    ids = tuple(tok.convert_tokens_to_ids(s) for s in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"))
    src = str(tmp / "base")
    base_torch = make_hf_checkpoint(src, seed=3, vocab=n + 16 if spare_rows else n, ids=ids, tie=tie)
    base = hf_checkpoint.from_hf(src, mesh=one_device_mesh())
    model = extend.add_functional_tokens(base, tok, layer=1, num_heads=2, head_dim=16)
    out = str(tmp / "exported")
    hf_checkpoint.to_hf(model, out, tokenizer=tok)
    ref = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, attn_implementation="eager").eval()
    return Extended(tok, n, src, out, base_torch, model, ref, spare_rows, tie)


def _word_ids(tok, words):
    """Ids of each word as written alone and mid-sentence (" word"), deduplicated."""
    return sorted({i for w in words for form in (w, " " + w) for i in tok.encode(form, add_special_tokens=False)})


def test_functional_rows_are_word_means_end_to_end(extended):
    """In the checkpoint transformers loads, each new embedding row and output-head row is the mean
    of the source checkpoint's rows for the token's descriptive words; old rows are unchanged."""
    x = extended
    func = x.model.cfg.visual_ops.token_ids
    assert [x.tok.convert_ids_to_tokens(i) for i in func] == [t.token for t in DEFAULT_TOKENS]
    assert all(len(x.tok.encode(t.token, add_special_tokens=False)) == 1 for t in DEFAULT_TOKENS)
    V = x.model.cfg.text.vocab_size
    V0 = x.base_torch.config.text_config.vocab_size
    assert V == (V0 if x.spare_rows else -(-(x.n + 5) // 128) * 128)
    assert x.ref.config.text_config.vocab_size == V
    assert x.ref.config.tie_word_embeddings == x.tie

    with torch.no_grad():
        tables = {
            "embedding": (x.base_torch.get_input_embeddings().weight.numpy(), x.ref.get_input_embeddings().weight.numpy()),
            "output head": (x.base_torch.get_output_embeddings().weight.numpy(), x.ref.get_output_embeddings().weight.numpy()),
        }
    if x.tie:
        assert x.ref.get_output_embeddings().weight.data_ptr() == x.ref.get_input_embeddings().weight.data_ptr()
    else:  # untied: the head's rows come from the head, not from the embedding
        assert not np.allclose(tables["embedding"][0], tables["output head"][0])
    for what, (old, new) in tables.items():
        assert new.shape == (V, old.shape[1]), what
        for t, i in zip(DEFAULT_TOKENS, func):
            np.testing.assert_allclose(new[i], old[_word_ids(x.tok, t.words)].mean(0), atol=1e-6, rtol=0, err_msg=f"{what} {t.token}")
        np.testing.assert_array_equal(new[: x.n], old[: x.n], err_msg=what)
        rest = [i for i in range(x.n + 5, V)]
        if x.spare_rows:  # spare rows no token took keep their values
            np.testing.assert_array_equal(new[rest], old[rest], err_msg=what)
        else:  # grown rows no token took hold the mean of all old rows
            np.testing.assert_allclose(new[rest], np.broadcast_to(old.mean(0), (len(rest), old.shape[1])), atol=1e-6, rtol=0, err_msg=what)


def _with_functional(e, func, vstart, vend, rng):
    """`e` with a functional token before and after each image and three among trailing text."""
    out, k = [], 0

    def take():
        nonlocal k
        k += 1
        return int(func[(k - 1) % len(func)])

    for t in e.ids:
        if t == vstart:
            out.append(take())
        out.append(t)
        if t == vend:
            out.append(take())
    for _ in range(3):
        out += [take(), int(rng.integers(0, 256))]
    e.ids = out
    return e


def _examples(x, case):
    image, vstart, vend = (x.tok.convert_tokens_to_ids(s) for s in ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>"))
    func = x.model.cfg.visual_ops.token_ids
    rng = np.random.default_rng(10)
    grids = {
        "text_only": [[]],
        "one_image": [[(1, 8, 12)]],
        "two_images_of_different_sizes": [[(1, 8, 12), (1, 6, 4)]],
        "padded_batch": [[(1, 4, 6)], [(1, 8, 8), (1, 4, 4)], []],
    }[case]
    return [
        _with_functional(example(rng, 3 + 4 * i, g, 2 * i, image_ids=(image, vstart, vend)), func, vstart, vend, rng)
        for i, g in enumerate(grids)
    ]


@pytest.mark.parametrize(
    "case, pad_left",
    [("text_only", False), ("one_image", False), ("two_images_of_different_sizes", False), ("padded_batch", False), ("padded_batch", True)],
)
def test_functional_rows_keep_transformers_parity(extended, case, pad_left):
    """With the new rows in place and the gates at zero, the model still computes what transformers
    computes from the exported checkpoint (which ignores the visual-op file), functional tokens included."""
    examples = _examples(extended, case)
    func = set(extended.model.cfg.visual_ops.token_ids)
    assert all(func & set(e.ids) for e in examples)
    assert_logits_match(extended.model, extended.ref, examples, pad_left=pad_left, atol=1e-4)


def test_visual_ops_come_back_from_their_own_file(extended):
    """The visual-op modules (config in the file's metadata, weights) are restored by from_hf."""
    again = hf_checkpoint.from_hf(extended.out, mesh=one_device_mesh())
    assert again.cfg.visual_ops == extended.model.cfg.visual_ops
    for name in ("wq", "wk", "wv", "wo", "gate", "query_norm", "image_norm"):
        np.testing.assert_array_equal(np.asarray(getattr(again.visual_ops, name)[...]), np.asarray(getattr(extended.model.visual_ops, name)[...]))


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
        hf_checkpoint.from_hf(path, mesh=one_device_mesh())
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
    _raises(d, os.path.join(d, "model.safetensors"), "model.norm.weight", "int32", "floating")


def test_missing_tensor(ckpt, tmp_path):
    d = _copy(ckpt, tmp_path)
    t = _tensors(d)
    del t["visual.merger.mlp.2.bias"]
    save_file(t, os.path.join(d, "model.safetensors"))
    _raises(d, os.path.join(d, "model.safetensors") + ": missing tensor visual.merger.mlp.2.bias")


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
    a = hf_checkpoint.from_hf(d, mesh=one_device_mesh())
    b = hf_checkpoint.from_hf(ckpt, mesh=one_device_mesh())
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
    _raises(d2, index + ": missing tensor model.norm.weight", "no entry")


def test_index_entry_in_a_shard_without_the_tensor(ckpt, tmp_path):
    d, wm = _shard(ckpt, tmp_path)
    index = os.path.join(d, "model.safetensors.index.json")
    other = {f for f in wm.values() if f != wm["model.norm.weight"]}.pop()
    json.dump({"weight_map": dict(wm, **{"model.norm.weight": other})}, open(index, "w"))
    _raises(d, index, "incomplete shard index", "model.norm.weight", os.path.join(d, other))
    json.dump({"weight_map": [["model.norm.weight", other]]}, open(index, "w"))
    _raises(d, index, "weight_map")


# ---------------------------------------------------------------------- the visual-op file
OPS = hf_checkpoint.VISUAL_OPS_FILE


@pytest.fixture(scope="module")
def ops_ckpt(ckpt, tmp_path_factory):
    """`ckpt` with three fresh visual-op modules, exported (so it has an atlas_visual_ops file)."""
    ops = VisualOpConfig(token_ids=(310, 311, 312), layer=1, num_heads=2, head_dim=16)
    model = hf_checkpoint.from_hf(ckpt, mesh=one_device_mesh(), visual_ops=ops)
    model.visual_ops.gate[...] = jnp.array([0.5, -1.0, 2.0])
    out = str(tmp_path_factory.mktemp("ops_export"))
    hf_checkpoint.to_hf(model, out)
    return out


def _edit_ops(d, edit):
    f = SafetensorsFile(os.path.join(d, OPS))
    t, meta = {k: np.asarray(v) for k, v in f.items()}, dict(f.metadata)
    edit(t, meta)
    save_file(t, os.path.join(d, OPS), metadata=meta)


def test_visual_ops_file_round_trips(ops_ckpt, tmp_path):
    model = hf_checkpoint.from_hf(ops_ckpt, mesh=one_device_mesh())
    assert model.cfg.visual_ops.token_ids == (310, 311, 312)
    np.testing.assert_array_equal(np.asarray(model.visual_ops.gate[...]), [0.5, -1.0, 2.0])
    out = str(tmp_path / "again")
    hf_checkpoint.to_hf(model, out)
    a, b = (SafetensorsFile(os.path.join(p, OPS)) for p in (ops_ckpt, out))
    assert sorted(a) == sorted(b) and all(a[k].tobytes() == b[k].tobytes() for k in a)


def test_visual_ops_file_missing_tensor(ops_ckpt, tmp_path):
    d = _copy(ops_ckpt, tmp_path)
    _edit_ops(d, lambda t, m: t.pop("visual_ops.wk"))
    _raises(d, os.path.join(d, OPS) + ": missing tensor visual_ops.wk")


def test_visual_ops_file_wrong_shape(ops_ckpt, tmp_path):
    d = _copy(ops_ckpt, tmp_path)
    _edit_ops(d, lambda t, m: t.update({"visual_ops.wo": t["visual_ops.wo"][:, :1]}))
    _raises(d, os.path.join(d, OPS), "visual_ops.wo", "shape (3, 1, 16, 64), expected (3, 2, 16, 64)")


def test_visual_ops_file_config_disagrees_with_the_weights(ops_ckpt, tmp_path):
    """Metadata (or an override) with more heads than the saved weights: the shapes are named."""
    d = _copy(ops_ckpt, tmp_path)
    with pytest.raises(hf_checkpoint.CheckpointError) as e:
        hf_checkpoint.from_hf(d, mesh=one_device_mesh(), visual_ops=VisualOpConfig(token_ids=(310, 311, 312), layer=1, num_heads=4, head_dim=16))
    msg = str(e.value)
    assert msg.startswith(os.path.join(d, OPS) + ": tensor visual_ops.w"), msg
    assert "shape (3, 64, 2, 16), expected (3, 64, 4, 16)" in msg, msg


def test_visual_ops_file_wrong_dtype(ops_ckpt, tmp_path):
    d = _copy(ops_ckpt, tmp_path)
    _edit_ops(d, lambda t, m: t.update({"visual_ops.gate": t["visual_ops.gate"].astype(np.int32)}))
    _raises(d, os.path.join(d, OPS), "visual_ops.gate", "int32", "floating")


@pytest.mark.parametrize("meta", ["{not json", json.dumps({"mode": "module"}), json.dumps({"token_ids": [1], "heads": 2})])
def test_visual_ops_file_bad_metadata(ops_ckpt, tmp_path, meta):
    d = _copy(ops_ckpt, tmp_path)
    _edit_ops(d, lambda t, m: m.update(visual_ops=meta))
    _raises(d, os.path.join(d, OPS), "metadata 'visual_ops'", "token_ids")


def test_visual_ops_file_truncated(ops_ckpt, tmp_path):
    d = _copy(ops_ckpt, tmp_path)
    p = os.path.join(d, OPS)
    data = open(p, "rb").read()
    open(p, "wb").write(data[: len(data) - 100])
    _raises(d, p, "truncated")


# ---------------------------------------------------------------------- sharded loading
def _file_view(a) -> bool:
    """True when `a` is a view of a memory-mapped file (so nothing of it has been copied yet)."""
    while isinstance(a, np.ndarray):
        a = a.base
    return isinstance(a, mmap.mmap)


@pytest.mark.parametrize("layout", ["single_file", "shard_index", "visual_ops"])
def test_load_reads_only_each_devices_slice(ckpt, ops_ckpt, tmp_path, monkeypatch, layout):
    """On a 2x2x2 mesh every parameter equals the single-device load, has the sharding its logical
    axes give, and is built from per-device slices of lazy file views (no whole-tensor copy)."""
    d = {"single_file": ckpt, "shard_index": lambda: _shard(ckpt, tmp_path)[0], "visual_ops": ops_ckpt}[layout]
    d = d() if callable(d) else d
    full = hf_checkpoint.from_hf(d, mesh=one_device_mesh())

    read, sliced = hf_checkpoint._read, []

    def read_spy(*a, **k):
        view = read(*a, **k)
        assert _file_view(view), "the tensor was copied before slicing"
        return view

    make = jax.make_array_from_callback

    def make_spy(shape, sh, cb):
        def one(idx):
            x = cb(idx)
            assert x.shape == sh.shard_shape(shape), (shape, sh, x.shape)
            sliced.append(x.size < int(np.prod(shape)))
            return x

        return make(shape, sh, one)

    monkeypatch.setattr(hf_checkpoint, "_read", read_spy)
    monkeypatch.setattr(jax, "make_array_from_callback", make_spy)
    mesh = sharding.make_mesh((2, 2, 2))
    model = hf_checkpoint.from_hf(d, mesh=mesh)
    monkeypatch.undo()

    assert sum(sliced) > len(sliced) // 2, "most callbacks read a proper slice"
    want = dict(nnx.to_flat_state(sharding.state_shardings(nnx.state(model, nnx.Param), mesh)))
    a, b = dict(nnx.to_flat_state(nnx.state(full, nnx.Param))), nnx.to_flat_state(nnx.state(model, nnx.Param))
    for path, var in b:
        x = var.get_value()
        assert x.sharding == want[path].get_value(), path
        np.testing.assert_array_equal(np.asarray(x), np.asarray(a[path].get_value()), err_msg=str(path))

"""Malformed Hugging Face checkpoints: each config.json or safetensors header defect is a
CheckpointError naming the file and the field; and the config rules transformers 5 follows
(a tie flag only inside text_config) give its logits."""

import json
import os
import shutil
import struct

import numpy as np
import pytest
from transformers import Qwen2_5_VLForConditionalGeneration

from atlas_jax import hf_checkpoint
from atlas_jax.safetensors_io import SafetensorsFile
from hf_model_fixture import assert_logits_match, ckpt, example, make_hf_checkpoint, one_device_mesh  # noqa: F401 (ckpt: a fixture)




def _copy(ckpt, tmp_path):
    dst = str(tmp_path / "bad")
    shutil.copytree(ckpt, dst)
    return dst


def _raises(path, *fragments):
    with pytest.raises(hf_checkpoint.CheckpointError) as e:
        hf_checkpoint.from_hf(path, mesh=one_device_mesh())
    for f in fragments:
        assert f in str(e.value), str(e.value)


# ---------------------------------------------------------------------- config.json
def _text(**kw):
    return lambda d: d["text_config"].update(kw)


def _flat_yarn(d):
    """The released layout (text fields at the top level) with the YaRN block Qwen's model card shows."""
    text = d.pop("text_config")
    text.pop("rope_parameters")
    text.pop("model_type")
    d.update(text, rope_scaling={"type": "yarn", "mrope_section": [2, 3, 3], "factor": 4, "original_max_position_embeddings": 512})


CONFIG_DEFECTS = {
    "a_list": (lambda d: [d], "a JSON list, expected an object"),
    "text_config_a_string": (lambda d: d.update(text_config="qwen"), "text_config is a str, expected a JSON object"),
    "vocab_size_a_string": (_text(vocab_size="320"), "vocab_size='320', expected an integer >= 1"),
    "no_layers": (_text(num_hidden_layers=0), "num_hidden_layers=0, expected an integer >= 1"),
    "vision_depth_a_float": (lambda d: d["vision_config"].update(depth=3.0), "vision_config.depth=3.0"),
    "mrope_section_a_string": (
        _text(rope_parameters={"rope_type": "default", "mrope_section": "233"}), "rope_parameters.mrope_section='233'"
    ),
    "tie_flag_a_string": (_text(tie_word_embeddings="yes"), "text_config.tie_word_embeddings='yes', expected true or false"),
    "linear_rope": (
        _text(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}),
        "rope_parameters.rope_type='linear' is not supported",
    ),
    "yarn_rope_released_layout": (_flat_yarn, "rope_scaling.type='yarn' is not supported"),
    "text_activation": (_text(hidden_act="relu6"), "text.hidden_act='relu6' (the text tower's MLP)"),
    "vision_activation": (lambda d: d["vision_config"].update(hidden_act="swish"), "vision.hidden_act='swish' (the vision tower's MLP)"),
}


@pytest.mark.parametrize("defect", sorted(CONFIG_DEFECTS))
def test_malformed_config_names_the_file_and_field(ckpt, tmp_path, defect):
    edit, message = CONFIG_DEFECTS[defect]
    d = _copy(ckpt, tmp_path)
    path = os.path.join(d, "config.json")
    config = json.load(open(path))
    config = edit(config) or config
    json.dump(config, open(path, "w"))
    _raises(d, path + ": ", message)


def test_deeply_nested_config_is_invalid_json(ckpt, tmp_path):
    d = _copy(ckpt, tmp_path)
    path = os.path.join(d, "config.json")
    open(path, "w").write('{"vision_config": ' + "[" * 100_000 + "]" * 100_000 + "}")
    _raises(d, path + ": not valid JSON (RecursionError")


def test_mrope_type_of_released_checkpoints_loads(ckpt, tmp_path):
    """'mrope' (the released checkpoints' name for the default) is not scaling, so it loads."""
    d = _copy(ckpt, tmp_path)
    path = os.path.join(d, "config.json")
    config = json.load(open(path))
    config["text_config"]["rope_parameters"] = {"type": "mrope", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    json.dump(config, open(path, "w"))
    assert hf_checkpoint.from_hf(d, mesh=one_device_mesh()).cfg.text.mrope_section == (2, 3, 3)


def test_tie_flag_only_inside_text_config_ties_like_transformers(tmp_path):
    """Top-level tie_word_embeddings false, true inside text_config, no lm_head tensor: transformers 5
    ties the head to the embedding, and so does from_hf, with its logits."""
    d = str(tmp_path / "tied")
    make_hf_checkpoint(d, tie=True, seed=5)
    path = os.path.join(d, "config.json")
    config = json.load(open(path))
    config["tie_word_embeddings"] = False
    assert config["text_config"]["tie_word_embeddings"] is True
    json.dump(config, open(path, "w"))
    assert "lm_head.weight" not in SafetensorsFile(os.path.join(d, "model.safetensors"))

    ref = Qwen2_5_VLForConditionalGeneration.from_pretrained(d, attn_implementation="eager").eval()
    assert ref.config.tie_word_embeddings
    model = hf_checkpoint.from_hf(d, mesh=one_device_mesh())
    assert model.cfg.text.tie_word_embeddings
    rng = np.random.default_rng(0)
    assert_logits_match(model, ref, [example(rng, 5, [(1, 8, 8)], 4), example(rng, 9, [], 0)], pad_left=False, atol=1e-4)


# ---------------------------------------------------------------------- safetensors headers
def _write_header(path, header, data=b"\0" * 64):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)


NORM = {"dtype": "F32", "shape": [64], "data_offsets": [0, 256]}
HEADER_DEFECTS = {
    "a_list": ([NORM], "the header is a JSON list, expected an object"),
    "a_number_as_entry": ({"model.norm.weight": 3}, "header entry 'model.norm.weight' is a int"),
    "no_data_offsets": ({"model.norm.weight": {"dtype": "F32", "shape": [64]}}, "tensor 'model.norm.weight' has data_offsets=None"),
    "string_offsets": ({"model.norm.weight": dict(NORM, data_offsets=["0", "256"])}, "tensor 'model.norm.weight' has data_offsets=['0', '256']"),
    "float_shape": ({"model.norm.weight": dict(NORM, shape=[64.0])}, "tensor 'model.norm.weight' has shape=[64.0]"),
    "negative_offsets": ({"model.norm.weight": dict(NORM, data_offsets=[-64, 192])}, "tensor 'model.norm.weight' has data_offsets=[-64, 192]"),
    "overlapping_offsets": (
        {"model.norm.weight": NORM, "model.embed_tokens.weight": dict(NORM, data_offsets=[128, 384])},
        "data_offsets that overlap",
    ),
    "deeply_nested": (b'{"model.norm.weight": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "RecursionError"),
    "metadata_not_strings": ({"__metadata__": {"format": 1}}, "__metadata__ is not an object of strings"),
}


@pytest.mark.parametrize("defect", sorted(HEADER_DEFECTS))
def test_malformed_safetensors_header_names_the_file_and_field(ckpt, tmp_path, defect):
    header, message = HEADER_DEFECTS[defect]
    d = _copy(ckpt, tmp_path)
    path = os.path.join(d, "model.safetensors")
    _write_header(path, header, data=b"\0" * 384)
    _raises(d, path + ": ", message)


def test_overlapping_offsets_in_a_shard_name_the_shard(ckpt, tmp_path):
    """The same check on a sharded checkpoint names the shard, not the index."""
    d = _copy(ckpt, tmp_path)
    os.replace(os.path.join(d, "model.safetensors"), os.path.join(d, "model-00001-of-00001.safetensors"))
    names = list(SafetensorsFile(os.path.join(d, "model-00001-of-00001.safetensors")))
    json.dump({"weight_map": {n: "model-00001-of-00001.safetensors" for n in names}}, open(os.path.join(d, "model.safetensors.index.json"), "w"))
    shard = os.path.join(d, "model-00001-of-00001.safetensors")
    _write_header(shard, {n: NORM for n in names[:2]}, data=b"\0" * 256)
    _raises(d, shard + ": tensor data do not match the header")

"""An SFT run with LoRA on a local Hugging Face checkpoint (`model.init_from_hf`), stopped and
resumed, continues the uninterrupted run's losses exactly: the checkpoints hold the adapters and
their optimizer state, and the base weights are read from the HF checkpoint again."""

import os

import pytest

from atlas_jax import builders, main as entry, tokenizer as tokenizer_lib
from hf_model_fixture import make_hf_checkpoint
from test_sft_job import _config, _losses


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory):
    """(config overrides, data dir): a tiny HF checkpoint whose tokenizer (and image token ids)
    is the synthetic data's BPE, so the job loads both from it."""
    root = tmp_path_factory.mktemp("lora_hf")
    data, scratch, hf = str(root / "data"), str(root / "scratch"), str(root / "hf")
    c = _config(**{"data.data_dir": data})
    builders.build_data(c, scratch)
    tok = builders.make_tokenizer(c, scratch)
    tokens = tokenizer_lib.RunTokens.of(tok, c.model.functional_tokens)
    ids = (tokens.image_id, tokens.video_id, tokens.vision_start_id, tokens.vision_end_id)
    make_hf_checkpoint(hf, vocab=-(-len(tok) // 128) * 128, ids=ids)
    tok.save_pretrained(hf)
    return {"data.data_dir": data, "model.init_from_hf": hf, "model.lora.rank": 4, "model.lora.base_dtype": "bfloat16"}


@pytest.mark.slow
def test_lora_run_from_a_hf_checkpoint_resumes_with_the_uninterrupted_losses(tmp_path, hf_run):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    entry.run_job(_config(**hf_run), a)
    entry.run_job(_config(**hf_run, **{"train.stop_at": 2}), b)
    assert sorted(_losses(b)) == [1, 2]
    entry.run_job(_config(**hf_run), b)
    la, lb = _losses(a), _losses(b)
    assert sorted(la) == sorted(lb) == [1, 2, 3, 4]
    assert la == lb
    assert la[4] < la[1]
    assert os.path.exists(os.path.join(b, "config.json"))

"""The compile check builds the run's LoRA model: its abstract SFT state holds the adapters, their
optimizer state alone, and the frozen base in `model.lora.base_dtype` (no arrays created)."""

import jax
from flax import nnx

from atlas_jax import builders, compile_check
from test_compile_check import TOPOLOGY, config, small


def _bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def test_abstract_sft_state_has_the_adapters_and_a_bfloat16_base():
    devices, _ = compile_check.topology_devices(TOPOLOGY)
    states = {}
    for name, over in {"full": {}, "lora": {"rank": 8}, "lora_bf16": {"rank": 8, "base_dtype": "bfloat16"}}.items():
        c = small(config("sft_synthetic", "module"))
        c.model.lora.update(over)
        mesh = builders.make_mesh(c, devices)
        model_cfg = compile_check.shape_model_config(c, mesh)
        graphdef, _, _, state, _ = compile_check.abstract_state(c, model_cfg, mesh, total_steps=10)
        params = nnx.merge(graphdef, state.params)
        adapters = nnx.state(params, nnx.LoRAParam)
        base = nnx.state(params, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
        states[name] = (_bytes(adapters), _bytes(base), _bytes(state.opt_state))
    (a0, base0, opt0), (a, base, opt), (a16, base16, opt16) = states["full"], states["lora"], states["lora_bf16"]
    assert a0 == 0 and a > 0 and a16 == a
    assert base == base0 and base16 * 2 == base0
    # Adam's two float32 moments: of every parameter without LoRA, of the adapters alone with it.
    assert opt0 >= 2 * base0 and 2 * a <= opt < 2 * a + 1024 and opt16 == opt

"""Low-rank adapters (LoRA) on the decoder's projections, by `qwix` (what tunix uses).

`qwix.apply_lora_to_model` intercepts the `dot_general` of every `Dense` whose module path
('layers/3/attn/q_proj') matches `LoraConfig.module_regex`: y = x W + (alpha / r) (x A) B, with
A he-uniform and B zero, so a fresh adapter leaves the model unchanged. The adapters are
`nnx.LoRAParam`s named `<weight>_lora_a` float[K, r] and `<weight>_lora_b` float[r, N], where
K and N are the weight's flattened input and output sizes (`tensordot_rows` hands qwix the
kernel reshaped to [K, N]). Training differentiates and optimizes them alone
(`train.optimizer.trainable`); the base weights stay frozen, so `base_dtype` may store them in
bfloat16 (half the bytes of float32) while the adapters and their optimizer state stay float32.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import qwix
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from atlas_jax.model.vlm import VLM

BASE_DTYPES = ("param_dtype", "bfloat16")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """The config section `model.lora`. rank: r (0 = no adapters); alpha: the update's scale is
    alpha / r; module_regex: fully matches the module paths that get adapters (default: every
    projection of the decoder layers, so not the vision tower, the output head or the
    visual-operation module); base_dtype: how the frozen base weights (every parameter that is not
    an adapter) are stored: 'param_dtype' (as `model.param_dtype`) or 'bfloat16'."""

    rank: int = 0
    alpha: float = 16.0
    module_regex: str = r"layers/\d+/(attn|mlp)/\w+_proj"
    base_dtype: str = "param_dtype"

    def __post_init__(self):
        if not (isinstance(self.rank, int) and self.rank >= 0):
            raise ValueError(f"rank={self.rank!r}: expected an integer >= 0 (0 = no adapters)")
        if not self.alpha > 0:
            raise ValueError(f"alpha={self.alpha!r}: expected > 0")
        if self.base_dtype not in BASE_DTYPES:
            raise ValueError(f"base_dtype={self.base_dtype!r}: expected one of {BASE_DTYPES}")
        try:
            pattern = re.compile(self.module_regex)
        except re.error as e:
            raise ValueError(f"module_regex={self.module_regex!r}: not a regular expression ({e})") from None
        # Adapters are created by one text-only forward, which never runs the tower; and qwix
        # cannot adapt the visual-operation module's three-operand einsums.
        for path in ("vision/blocks/0/attn/qkv", "visual_ops/query"):
            if pattern.fullmatch(path):
                raise ValueError(f"module_regex={self.module_regex!r} matches {path!r}: "
                                 "adapters go on the decoder ('layers/...', 'lm_head') only")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def apply(model: VLM, cfg: LoraConfig, *, seed: int = 0) -> VLM:
    """A copy of the sharded `model` with adapters on the matching projections. Adapters are
    replicated: r * (K + N) values per weight are negligible next to it, and need no sharding rule."""
    mesh = jax.tree.leaves(nnx.state(model))[0].sharding.mesh
    adapted = _with_adapters(model, cfg, seed)
    adapters = nnx.state(adapted, nnx.LoRAParam)
    nnx.update(adapted, jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P())), adapters))
    return adapted


def abstract(model_cfg, cfg: LoraConfig) -> VLM:
    """The adapted model's shapes and dtypes, no arrays (`nnx.eval_shape`): what the compile
    check lowers the steps for."""
    return nnx.eval_shape(lambda: _with_adapters(VLM(model_cfg, rngs=nnx.Rngs(0)), cfg, 0))


def _with_adapters(model: VLM, cfg: LoraConfig, seed: int) -> VLM:
    """`model` adapted by qwix, which creates the adapters in one forward over a single text token;
    the frozen base weights then cast to `cfg.base_dtype`."""
    ids = jnp.zeros((1, 1), jnp.int32)
    # qwix creates each adapter inside the module that runs: the creating forward runs the layers
    # themselves, unrolled and without remat (a scan or remat runs copies of them).
    model_cfg = model.cfg
    model.cfg = model_cfg.replace(scan_layers=False, remat="none")
    try:
        adapted = qwix.apply_lora_to_model(
            model, qwix.LoraProvider(module_path=cfg.module_regex, rank=cfg.rank, alpha=cfg.alpha),
            ids, jnp.zeros((1, 3, 1), jnp.int32), jnp.ones((1, 1), bool), rngs=nnx.Rngs(seed),
        )
    finally:
        model.cfg = model_cfg
    adapted.cfg = model_cfg
    adapters = nnx.state(adapted, nnx.LoRAParam)
    if not jax.tree.leaves(adapters):
        raise ValueError(f"model.lora.module_regex={cfg.module_regex!r} matches no decoder projection")
    for _, var in nnx.to_flat_state(adapters):
        # qwix copies the kernel's `axes`, which do not fit the adapter's [K, r] / [r, N] shape.
        var.set_metadata("axes", (None, None))
    nnx.update(adapted, adapters)
    if cfg.base_dtype != "param_dtype":
        # After the adapters exist: qwix gives them the kernel's dtype, and they train in float32.
        base = nnx.state(adapted, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
        nnx.update(adapted, jax.tree.map(lambda x: x.astype(cfg.base_dtype), base))
    return adapted


def adapters_off(params: nnx.State) -> nnx.State:
    """`params` with every B set to zero: the base model's function, the same base weights (the
    LA-GRPO reference policy needs no second copy of them)."""

    def off(path, var):
        return var.replace(jnp.zeros_like(var.get_value())) if str(path[-1].key).endswith("_lora_b") else var

    return jax.tree_util.tree_map_with_path(off, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def merged(model: VLM, cfg: LoraConfig) -> VLM:
    """The plain `VLM` (no adapters, no qwix interception) with W + (alpha / r) A B in place of
    every adapted weight W: what `hf_checkpoint.to_hf` exports."""
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: VLM(model.cfg, rngs=nnx.Rngs(0))))
    values = {}
    for path, _ in nnx.to_flat_state(abstract):
        w = flat[path].get_value()
        a_path = path[:-1] + (f"{path[-1]}_lora_a",)
        if a_path in flat:
            a = flat[a_path].get_value().astype(jnp.float32)
            b = flat[path[:-1] + (f"{path[-1]}_lora_b",)].get_value().astype(jnp.float32)
            w = (w.astype(jnp.float32) + cfg.scale * (a @ b).reshape(w.shape)).astype(w.dtype)
        values[path] = w
    state = nnx.from_flat_state({p: v.replace(values[p]) for p, v in nnx.to_flat_state(abstract)})
    return nnx.merge(graphdef, state)

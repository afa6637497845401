"""The parameters as the compiled steps read them, and back: `llama.head_params` and `layer_params` with
their matmul weights packed for the CPU kernels (bf16 ones for `bf16_gemm`, quantized ones tiled for
`quant_gemm`), the embedding stored as bits, the rotary tables beside them; and the stacked pytree that
loaders and checkpoints use, rebuilt from those."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxserver.model import cpu_kernels, quant
from jaxserver.model.config import ModelConfig
from jaxserver.model.llama import (
    ROTARY_TABLES,
    Params,
    embedding_as_bits,
    head_params,
    layer_params,
    rotary_tables,
)

# What `linear` multiplies by: the head's and each layer's (after `layer_params`) matmul weights.
HEAD_MATMULS = ("lm_head",)
LAYER_MATMULS = ("wqkv", "wo", "w_gate_up", "w_down")


def pack_matmul_weights(
    head: Params, layers: list[Params], *, bf16: bool = True, quantized: bool = True
) -> tuple[Params, list[Params]]:
    """`head_params` and `layer_params` with every matmul weight a CPU kernel takes packed for it, so that
    `linear` multiplies by it there: with `bf16`, bfloat16 ones for the bf16 kernel
    (`cpu_kernels.pack_bf16_weight`); with `quantized`, quantized ones tiled for the quantized kernel
    (`quant.tiled`; a tied embedding stays the head's weight). The rest as they were. For a single
    device, where the kernels run: they read whole weights."""

    def packed(w: Any) -> Any:
        if quant.is_quantized(w):
            return quant.tiled(w) if quantized and w.shape[-1] % quant.TILE == 0 else w
        fits = bf16 and w.dtype == jnp.bfloat16 and cpu_kernels.bf16_gemm_takes(*w.shape)
        return cpu_kernels.pack_bf16_weight(w) if fits else w

    def pack(part: Params, names: tuple[str, ...]) -> Params:
        return {name: packed(w) if name in names else w for name, w in part.items()}

    tied = head["embed"] is head.get("lm_head")
    head = pack(head, HEAD_MATMULS)
    if tied:
        head["embed"] = head["lm_head"]
    return head, [pack(layer, LAYER_MATMULS) for layer in layers]


def serving_weights(params: Params, cfg: ModelConfig, positions: int) -> tuple[Params, list[Params]]:
    """`params` as the compiled steps read them: `head_params` and `layer_params`, matmul weights packed for
    the CPU matmul kernels where they run (`pack_matmul_weights`; they read each weight whole, so only when
    every weight lies on one device), the embedding table kept as bits for `embed_rows`, and the rotary
    tables of `positions` positions (`rotary_tables`), placed on every device the weights are on."""
    head, layers = head_params(params), layer_params(params, cfg)
    whole_weights = all(len(leaf.sharding.device_set) == 1 for leaf in jax.tree.leaves(params))
    if whole_weights:
        bf16, quantized = cpu_kernels.bf16_gemm_available(), cpu_kernels.quant_gemm_available()
        head, layers = pack_matmul_weights(head, layers, bf16=bf16, quantized=quantized)
    sharding = head["final_norm"].sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
        sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    tables = {name: jax.device_put(t, sharding) for name, t in rotary_tables(cfg, positions).items()}
    return embedding_as_bits(head) | tables, layers


def stacked_params(head: Params, layers: list[Params], cfg: ModelConfig) -> Params:
    """The parameter pytree `serving_weights` made `head` and `layers` from (new arrays, in the layout
    loaders and checkpoints use)."""
    head = {name: _unpacked(w) for name, w in head.items() if name not in ROTARY_TABLES}
    if not quant.is_quantized(head["embed"]) and head["embed"].dtype == jnp.uint16:
        head["embed"] = jax.lax.bitcast_convert_type(head["embed"], jnp.bfloat16)
    if cfg.tie_word_embeddings:
        del head["lm_head"]
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    splits = {
        "wqkv": (("wq", "wk", "wv"), (q, q + kv)),
        "w_gate_up": (("w_gate", "w_up"), (cfg.intermediate_size,)),
    }
    if cfg.attention_bias:
        splits["bqkv"] = (("bq", "bk", "bv"), (q, q + kv))

    def split(layer: Params) -> Params:
        parts = {}
        for name, w in layer.items():
            names, at = splits.get(name, ((name,), ()))
            cut = (
                quant.split_outputs(_unpacked(w), at)
                if quant.is_quantized(w)
                else jnp.split(_unpacked(w), at, axis=-1)
            )
            parts |= dict(zip(names, cut, strict=True))
        return parts

    per_layer = [split(layer) for layer in layers]
    stacked = {name: [layer[name] for layer in per_layer] for name in per_layer[0]}
    return head | {
        "layers": {name: jax.tree.map(lambda *a: jnp.stack(a), *ws) for name, ws in stacked.items()}
    }


def _unpacked(w: Any) -> Any:
    if quant.is_quantized(w):
        return quant.untiled(w)
    return cpu_kernels.unpack_bf16_weight(w) if cpu_kernels.is_packed(w) else w

"""A Llama-family decoder as pure functions over a parameter pytree, with an explicit KV cache.

Parameters (a plain dict; linear weights are stored [in, out] so layers compute `x @ w`; the per-layer
weights are stacked on a leading `layers` axis, the layout loaders and checkpoints use; `layer_params`
splits them into the per-layer buffers the forward pass runs on):

    embed        [vocab, hidden]
    final_norm   [hidden]
    lm_head      [hidden, vocab]                    (absent when embeddings are tied; `head_params` adds it)
    layers/attn_norm [L, hidden]       layers/mlp_norm [L, hidden]
    layers/wq    [L, hidden, heads*hd]  layers/wk, wv [L, hidden, kv_heads*hd]  layers/wo [L, heads*hd, hidden]
    layers/bq, bk, bv                               (only with attention bias, Qwen2)
    layers/w_gate, w_up [L, hidden, mlp]  layers/w_down [L, mlp, hidden]

Any matmul weight may instead be a `quant.QuantizedWeight` of that shape; a quantized tied table is kept
once, as the head's weight [hidden, vocab], and `embed_rows` gathers its columns.

`forward` runs over a contiguous cache per batch row: the unpaged reference that the paged step
(`paged.py`), which serves, is checked against. The cache's entry dtypes and their storage
(`cache_storage_dtype`, `to_cache`, `from_cache`) are shared by both.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxserver.model import cpu_kernels, quant
from jaxserver.model.config import ModelConfig

Params = dict[str, Any]

# Finite, so a fully masked row (a pad query) gives a harmless uniform softmax instead of NaN.
MASK_VALUE = -1e30


class KVCache(NamedTuple):
    """Keys and values per layer, each [rows, kv_heads, length, head_dim], entries stored as
    `cache_storage_dtype` gives."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]

    @property
    def length(self) -> int:
        return self.v[0].shape[2]


def cache_storage_dtype(dtype: Any) -> jnp.dtype:
    """The array dtype a cache of `dtype` entries is kept in: float32, float16, or bfloat16 kept as its
    16 bits in uint16 (XLA:CPU wrote one token into a bf16 array by copying the whole array, and writes
    integers in place)."""
    return jnp.dtype(jnp.uint16) if jnp.dtype(dtype) == jnp.bfloat16 else jnp.dtype(dtype)


def to_cache(x: jax.Array, storage: jnp.dtype) -> jax.Array:
    """Keys or values as the cache keeps them."""
    if storage == jnp.uint16:
        return jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16)
    return x.astype(storage)


def from_cache(entries: jax.Array) -> jax.Array:
    """Cache entries as float32."""
    if entries.dtype == jnp.uint16:
        entries = jax.lax.bitcast_convert_type(entries, jnp.bfloat16)
    return entries.astype(jnp.float32)


def init_cache(cfg: ModelConfig, rows: int, length: int, dtype: Any) -> KVCache:
    """An empty cache with entries of `dtype` (float32, float16 or bfloat16)."""
    shape = (rows, cfg.num_kv_heads, length, cfg.head_dim)
    zeros = tuple(jnp.zeros(shape, cache_storage_dtype(dtype)) for _ in range(cfg.num_layers))
    return KVCache(zeros, zeros)


# --- building blocks ----------------------------------------------------------------------------------


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (normed * weight.astype(jnp.float32)).astype(x.dtype)


def linear(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., in] @ w [in, out] in the weight's dtype, accumulated and returned in float32.

    A weight packed for the bf16 matmul kernel (`pack_matmul_weights`) goes through it. Otherwise, with
    bfloat16 weights this is XLA:CPU's bf16 x bf16 -> f32 dot (AVX512-BF16 where the CPU has it), faster
    than float32's. A bf16 result instead ran slower than float32, and a single row took another, much
    slower path than two rows: a lone row is therefore padded to two (docs/performance.md)."""
    if quant.is_quantized(w):
        return quant.linear(x, w)
    rows = math.prod(x.shape[:-1])
    if cpu_kernels.is_packed(w):
        return cpu_kernels.bf16_gemm(x.reshape(rows, -1), w).reshape(*x.shape[:-1], -1)
    if w.dtype == jnp.float32 or rows != 1:
        return jnp.matmul(x.astype(w.dtype), w, preferred_element_type=jnp.float32)
    pair = jnp.concatenate([x.reshape(1, -1), jnp.zeros((1, x.shape[-1]), x.dtype)]).astype(w.dtype)
    return jnp.matmul(pair, w, preferred_element_type=jnp.float32)[:1].reshape(*x.shape[:-1], -1)


def embed_rows(embed: jax.Array, tokens: jax.Array) -> jax.Array:
    """embed[tokens] as float32 (the residual stream's dtype in any weight dtype). XLA:CPU gathers no
    bf16: given a bf16 table, it converted the whole table to float32 first (once per decode chunk,
    hoisted out of its loop), and gathering it as 16-bit integers still copied it as integers once per
    chunk. A table stored as its bits (`embedding_as_bits`, uint16) is gathered in place
    (docs/performance.md)."""
    if quant.is_quantized(embed):
        return quant.embedding_rows(embed, tokens)
    if embed.dtype == jnp.uint16:
        return jax.lax.bitcast_convert_type(embed[tokens], jnp.bfloat16).astype(jnp.float32)
    return embed[tokens].astype(jnp.float32)


def embedding_as_bits(head: Params) -> Params:
    """`head` with a bf16 embedding table stored as its 16-bit patterns (uint16), which `embed_rows`
    reads; other dtypes unchanged."""
    if quant.is_quantized(head["embed"]) or head["embed"].dtype != jnp.bfloat16:
        return head
    return head | {"embed": jax.lax.bitcast_convert_type(head["embed"], jnp.uint16)}


def rope_inverse_frequencies(cfg: ModelConfig) -> np.ndarray:
    """Per-pair rotation frequencies [head_dim // 2], with the config's rope scaling applied."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        original = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (original / wavelen - low) / (high - low)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = np.where(
            wavelen > original / low,
            inv_freq / factor,
            np.where(wavelen < original / high, inv_freq, blended),
        )
    elif kind == "freq_factors":  # llama.cpp's rope_freqs tensor: a divisor per frequency
        inv_freq = inv_freq / np.asarray(scaling["factors"], dtype=np.float64)
    elif kind != "default":
        raise ValueError(
            f"unsupported rope scaling {kind!r}; supported: default, linear, llama3, freq_factors"
        )
    return inv_freq.astype(np.float32)


def rotary(positions: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """cos and sin of the rotation angles at positions [B, S]: [B, S, 1, hd/2] each, shared by layers."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inverse_frequencies(cfg))
    return jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]


ROTARY_TABLES = ("rotary_cos", "rotary_sin")


def rotary_tables(cfg: ModelConfig, positions: int) -> dict[str, np.ndarray]:
    """cos and sin of the rotation angles at positions 0 .. positions - 1, [positions, hd/2] float32 each
    (computed in float64), named as `serving_weights` keeps them."""
    angles = np.arange(positions, dtype=np.float64)[:, None] * rope_inverse_frequencies(cfg)
    return {
        name: f(angles).astype(np.float32) for name, f in zip(ROTARY_TABLES, (np.cos, np.sin), strict=True)
    }


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate query/key pairs (first half, second half) of each head. x: [B, S, heads, hd]."""
    x32 = x.astype(jnp.float32)
    first, second = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x.dtype)


def attention(q: jax.Array, k_t: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention of a prompt piece, without copying K/V per query head.

    q [B, S, kv_heads, group, hd]; k_t [B, kv_heads, hd, T]; v [B, kv_heads, T, hd]; mask [B, S, T]
    -> [B, S, kv_heads*group*hd]
    """
    scale = q.shape[-1] ** -0.5
    scores = jnp.einsum("bskgd,bkdt->bkgst", q, k_t, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask[:, None, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgst,bktd->bskgd", probs, v)
    return out.reshape(*out.shape[:2], -1)


# --- the forward pass ---------------------------------------------------------------------------------
#
# The layers are unrolled over per-layer weight buffers (`layer_params`) rather than scanned over the
# stacked ones: indexing a stacked weight with a loop counter copies it every layer, and for decoding,
# which is bound by reading the weights, that copy would double the traffic.


def layer_params(params: Params, cfg: ModelConfig) -> list[Params]:
    """Per-layer weights as separate buffers, with Q/K/V and gate/up concatenated (one matmul each)."""
    stacked = params["layers"]
    layers = []
    for i in range(cfg.num_layers):
        layer = {name: jax.tree.map(lambda a, i=i: a[i], value) for name, value in stacked.items()}
        layer["wqkv"] = quant.join_outputs([layer.pop("wq"), layer.pop("wk"), layer.pop("wv")])
        layer["w_gate_up"] = quant.join_outputs([layer.pop("w_gate"), layer.pop("w_up")])
        if cfg.attention_bias:
            layer["bqkv"] = jnp.concatenate([layer.pop("bq"), layer.pop("bk"), layer.pop("bv")], axis=-1)
        layers.append(layer)
    return layers


def project_qkv(
    x: jax.Array, layer: Params, cfg: ModelConfig, cos: jax.Array, sin: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A layer's queries, keys and values of x [B, S, hidden], rotated by cos, sin [B, S, 1, hd/2]:
    q [B, S, kv_heads, group, hd], k and v [B, S, kv_heads, hd]."""
    batch, seq, _ = x.shape
    heads, kv_heads, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    qkv = linear(rms_norm(x, layer["attn_norm"], cfg.rms_norm_eps), layer["wqkv"])
    if cfg.attention_bias:
        qkv = qkv + layer["bqkv"]
    q, k, v = jnp.split(qkv, [heads * hd, (heads + kv_heads) * hd], axis=-1)
    q = apply_rope(q.reshape(batch, seq, heads, hd), cos, sin)
    k = apply_rope(k.reshape(batch, seq, kv_heads, hd), cos, sin)
    return q.reshape(batch, seq, kv_heads, heads // kv_heads, hd), k, v.reshape(batch, seq, kv_heads, hd)


def finish_layer(x: jax.Array, attended: jax.Array, layer: Params, cfg: ModelConfig) -> jax.Array:
    """The residual stream x [B, S, hidden] after a layer whose attention gave `attended` [B, S, heads *
    hd]: the output projection, then the MLP."""
    x = x + linear(attended, layer["wo"])
    gate, up = jnp.split(
        linear(rms_norm(x, layer["mlp_norm"], cfg.rms_norm_eps), layer["w_gate_up"]), 2, axis=-1
    )
    return x + linear(jax.nn.silu(gate) * up, layer["w_down"])


def forward(
    params: Params,
    layers: list[Params],
    cfg: ModelConfig,
    tokens: jax.Array,
    cache: KVCache,
    write_pos: jax.Array,
    logit_index: jax.Array | None = None,
) -> tuple[jax.Array, KVCache]:
    """Run `tokens` [B, S] through the decoder, row b's at positions write_pos[b] .. write_pos[b]+S-1 of
    its cache row, attending to every earlier position of the row. `params` holds the embedding, final
    norm and head; `layers` comes from `layer_params`. Returns float32 logits [B, V] at `logit_index` [B]
    (or [B, S, V] at every position when None) and the updated cache."""
    batch, seq = tokens.shape
    positions = write_pos[:, None] + jnp.arange(seq)[None, :]  # [B, S]
    cos, sin = rotary(positions, cfg)
    mask = jnp.arange(cache.length)[None, None, :] <= positions[:, :, None]  # [B, S, T]
    rows = jnp.arange(batch)[:, None]
    x = embed_rows(params["embed"], tokens)
    new_k, new_v = [], []
    for layer, k_cache, v_cache in zip(layers, cache.k, cache.v, strict=True):
        q, k, v = project_qkv(x, layer, cfg, cos, sin)
        # Advanced indices around a slice: the indexed block is [B, S, kv_heads, hd], like k and v.
        k_cache = k_cache.at[rows, :, positions].set(to_cache(k, k_cache.dtype))
        v_cache = v_cache.at[rows, :, positions].set(to_cache(v, v_cache.dtype))
        keys = jnp.swapaxes(from_cache(k_cache), 2, 3)  # [B, kv_heads, hd, T]
        x = finish_layer(x, attention(q, keys, from_cache(v_cache), mask), layer, cfg)
        new_k.append(k_cache)
        new_v.append(v_cache)
    if logit_index is not None:
        x = x[jnp.arange(batch), logit_index]  # [B, hidden]
    x = rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
    return linear(x, params["lm_head"]), KVCache(tuple(new_k), tuple(new_v))


def head_params(params: Params) -> Params:
    """Everything but the stacked layers: what `forward` takes as `params`. A tied head gets its own
    [hidden, vocab] copy: multiplying by the transposed embedding made XLA copy the whole table (113 MB
    for SmolLM2) on every decode step."""
    head = {name: value for name, value in params.items() if name != "layers"}
    if "lm_head" not in head:  # a quantized table is kept as the head's weight: one copy serves both
        embed = params["embed"]
        head["lm_head"] = embed if quant.is_quantized(embed) else embed.T  # eager: a new row-major array
    return head


# --- parameters ---------------------------------------------------------------------------------------


def init_params(cfg: ModelConfig, key: jax.Array, dtype: Any = jnp.float32, scale: float = 0.02) -> Params:
    """Random parameters (for tests and benchmarks of shapes)."""
    d, f, hd, n = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.num_layers
    shapes = {
        "wq": (n, d, cfg.num_heads * hd),
        "wk": (n, d, cfg.num_kv_heads * hd),
        "wv": (n, d, cfg.num_kv_heads * hd),
        "wo": (n, cfg.num_heads * hd, d),
        "w_gate": (n, d, f),
        "w_up": (n, d, f),
        "w_down": (n, f, d),
    }
    if cfg.attention_bias:
        shapes |= {
            "bq": (n, cfg.num_heads * hd),
            "bk": (n, cfg.num_kv_heads * hd),
            "bv": (n, cfg.num_kv_heads * hd),
        }
    keys = jax.random.split(key, len(shapes) + 2)
    layers = {
        name: (scale * jax.random.normal(k, shape)).astype(dtype)
        for (name, shape), k in zip(shapes.items(), keys[2:], strict=True)
    }
    layers["attn_norm"] = jnp.ones((n, d), dtype)
    layers["mlp_norm"] = jnp.ones((n, d), dtype)
    params: Params = {
        "embed": (scale * jax.random.normal(keys[0], (cfg.vocab_size, d))).astype(dtype),
        "final_norm": jnp.ones((d,), dtype),
        "layers": layers,
    }
    if not cfg.tie_word_embeddings:
        params["lm_head"] = (scale * jax.random.normal(keys[1], (d, cfg.vocab_size))).astype(dtype)
    return params


def cast_params(params: Params, dtype: Any) -> Params:
    """`params` in `dtype`; host arrays stay on the host, so that placing them on the mesh copies each
    shard once (not the whole model onto one device first)."""

    def cast(array: Any) -> Any:
        if quant.is_quantized(array):  # codes stay codes
            return array
        return array.astype(dtype) if isinstance(array, np.ndarray) else jnp.asarray(array, dtype=dtype)

    return jax.tree.map(cast, params, is_leaf=quant.is_quantized)

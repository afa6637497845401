"""A Llama-family decoder as pure functions over a parameter pytree, with an explicit KV cache.

Parameters (a plain dict; linear weights are stored [in, out] so layers compute `x @ w`; the per-layer
weights are stacked on a leading `layers` axis so the layer loop is one `lax.scan`):

    embed        [vocab, hidden]
    final_norm   [hidden]
    lm_head      [hidden, vocab]                    (absent when embeddings are tied)
    layers/attn_norm [L, hidden]       layers/mlp_norm [L, hidden]
    layers/wq    [L, hidden, heads*hd]  layers/wk, wv [L, hidden, kv_heads*hd]  layers/wo [L, heads*hd, hidden]
    layers/bq, bk, bv                               (only with attention bias, Qwen2)
    layers/w_gate, w_up [L, hidden, mlp]  layers/w_down [L, mlp, hidden]

The cache holds, for every cache row ("slot"), keys and values at absolute cache indices. A row's valid
entries are [start, length): `start` > 0 only for left-padded prompts, whose pad tokens occupy the front.
Rotary positions are `index - start`, so padding never changes what a token sees.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxserver.model.config import ModelConfig

Params = dict[str, Any]

# Finite, so a fully masked row (a pad query) gives a harmless uniform softmax instead of NaN.
MASK_VALUE = -1e30


class KVCache(NamedTuple):
    k: jax.Array  # [layers, slots, length, kv_heads, head_dim]
    v: jax.Array  # [layers, slots, length, kv_heads, head_dim]

    @property
    def length(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


def init_cache(cfg: ModelConfig, slots: int, length: int, dtype: Any) -> KVCache:
    shape = (cfg.num_layers, slots, length, cfg.num_kv_heads, cfg.head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


# --- building blocks ----------------------------------------------------------------------------------


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (normed * weight.astype(jnp.float32)).astype(x.dtype)


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


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate query/key pairs (first half, second half) of each head. x: [B, S, heads, hd]; positions [B, S]."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, S, hd/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    first, second = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention without copying K/V per query head.

    q [B, S, kv_heads, group, hd]; k, v [B, T, kv_heads, hd]; mask [B, S, T] -> [B, S, kv_heads*group*hd]
    """
    scale = q.shape[-1] ** -0.5
    scores = jnp.einsum("bskgd,btkd->bkgst", q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask[:, None, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgst,btkd->bskgd", probs, v)
    return out.reshape(*out.shape[:2], -1)


def mlp(x: jax.Array, layer: Params) -> jax.Array:
    return (jax.nn.silu(x @ layer["w_gate"]) * (x @ layer["w_up"])) @ layer["w_down"]


# --- the forward pass ---------------------------------------------------------------------------------


def forward(
    params: Params,
    cfg: ModelConfig,
    tokens: jax.Array,
    cache: KVCache,
    write_pos: jax.Array,
    start: jax.Array,
    attn_len: int,
    slot_ids: jax.Array | None = None,
    logit_index: jax.Array | None = None,
) -> tuple[jax.Array, KVCache]:
    """Run `tokens` [B, S] through the decoder, writing their K/V into the cache.

    Row b's tokens go to cache row `slot_ids[b]` (all rows in order when None) at indices
    write_pos[b] .. write_pos[b]+S-1, and attend to that row's cache indices [start[b], own index] within
    the first `attn_len` (static) entries. Returns logits [B, V] at `logit_index` [B] (or [B, S, V] for
    every position when None) in float32, and the updated cache.
    """
    batch, seq = tokens.shape
    inv_freq = jnp.asarray(rope_inverse_frequencies(cfg))
    query_index = write_pos[:, None] + jnp.arange(seq)[None, :]  # [B, S]
    positions = query_index - start[:, None]
    key_index = jnp.arange(attn_len)
    mask = (key_index[None, None, :] <= query_index[:, :, None]) & (
        key_index[None, None, :] >= start[:, None, None]
    )  # [B, S, T]
    rows = jnp.arange(batch) if slot_ids is None else slot_ids
    group = cfg.num_heads // cfg.num_kv_heads
    hd = cfg.head_dim

    def layer_step(carry, layer_and_index):
        x, k_cache, v_cache = carry
        layer, i = layer_and_index
        h = rms_norm(x, layer["attn_norm"], cfg.rms_norm_eps)
        q, k, v = h @ layer["wq"], h @ layer["wk"], h @ layer["wv"]
        if cfg.attention_bias:
            q, k, v = q + layer["bq"], k + layer["bk"], v + layer["bv"]
        q = apply_rope(q.reshape(batch, seq, cfg.num_heads, hd), positions, inv_freq)
        k = apply_rope(k.reshape(batch, seq, cfg.num_kv_heads, hd), positions, inv_freq)
        v = v.reshape(batch, seq, cfg.num_kv_heads, hd)
        layer_index = jnp.broadcast_to(i, query_index.shape)
        k_cache = k_cache.at[layer_index, rows[:, None], query_index].set(
            k.astype(k_cache.dtype), mode="drop"
        )
        v_cache = v_cache.at[layer_index, rows[:, None], query_index].set(
            v.astype(v_cache.dtype), mode="drop"
        )
        k_layer, v_layer = k_cache[i], v_cache[i]  # [slots, length, kv_heads, hd]
        if slot_ids is None:
            k_seen, v_seen = k_layer[:, :attn_len], v_layer[:, :attn_len]
        else:
            k_seen, v_seen = k_layer[slot_ids, :attn_len], v_layer[slot_ids, :attn_len]
        q = q.reshape(batch, seq, cfg.num_kv_heads, group, hd)
        x = x + attention(q, k_seen, v_seen, mask) @ layer["wo"]
        x = x + mlp(rms_norm(x, layer["mlp_norm"], cfg.rms_norm_eps), layer)
        return (x, k_cache, v_cache), None

    x = params["embed"][tokens]
    layer_ids = jnp.arange(cfg.num_layers)
    (x, k_cache, v_cache), _ = jax.lax.scan(layer_step, (x, cache.k, cache.v), (params["layers"], layer_ids))
    if logit_index is not None:
        x = x[jnp.arange(batch), logit_index]  # [B, hidden]
    x = rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
    head = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
    logits = jnp.matmul(x, head, preferred_element_type=jnp.float32)
    return logits, KVCache(k_cache, v_cache)


# --- the decode step -----------------------------------------------------------------------------------
#
# Decoding one token per slot is bound by reading the weights and the cache, so the decode path avoids
# every copy XLA would otherwise make inside the step loop: the layers are unrolled over per-layer weight
# buffers (indexing a stacked weight with the scan counter copies it every layer), and attention reads
# per-layer K/V "windows" [slots, kv_heads, attn_len, head_dim] that the decode chunk cuts from the cache
# once (slicing the first `attn_len` entries of the big cache inside the loop copies and transposes them
# every layer of every step).


def decode_params(params: Params, cfg: ModelConfig) -> list[Params]:
    """Per-layer weights as separate buffers, with Q/K/V and gate/up concatenated, for `decode_step`."""
    stacked = params["layers"]
    layers = []
    for i in range(cfg.num_layers):
        layer = {name: value[i] for name, value in stacked.items()}
        layer["wqkv"] = jnp.concatenate([layer.pop("wq"), layer.pop("wk"), layer.pop("wv")], axis=1)
        layer["w_gate_up"] = jnp.concatenate([layer.pop("w_gate"), layer.pop("w_up")], axis=1)
        if cfg.attention_bias:
            layer["bqkv"] = jnp.concatenate([layer.pop("bq"), layer.pop("bk"), layer.pop("bv")], axis=-1)
        layers.append(layer)
    return layers


def cache_windows(
    cache: KVCache, slot_ids: jax.Array, attn_len: int
) -> tuple[list[jax.Array], list[jax.Array]]:
    """The first `attn_len` entries of cache rows `slot_ids` [B] (distinct), per layer, as
    [B, kv_heads, attn_len, head_dim] arrays."""
    num_layers = cache.k.shape[0]
    k = [jnp.swapaxes(cache.k[i, slot_ids, :attn_len], 1, 2) for i in range(num_layers)]
    v = [jnp.swapaxes(cache.v[i, slot_ids, :attn_len], 1, 2) for i in range(num_layers)]
    return k, v


def store_windows(cache: KVCache, slot_ids: jax.Array, k: list[jax.Array], v: list[jax.Array]) -> KVCache:
    """Write windows from `cache_windows` back into their cache rows."""
    attn_len = k[0].shape[2]
    k_cache, v_cache = cache
    for i, (k_window, v_window) in enumerate(zip(k, v, strict=True)):  # layer by layer: no stacked temporary
        k_cache = k_cache.at[i, slot_ids, :attn_len].set(jnp.swapaxes(k_window, 1, 2))
        v_cache = v_cache.at[i, slot_ids, :attn_len].set(jnp.swapaxes(v_window, 1, 2))
    return KVCache(k_cache, v_cache)


def decode_step(
    params: Params,
    layers: list[Params],
    cfg: ModelConfig,
    tokens: jax.Array,
    k_windows: list[jax.Array],
    v_windows: list[jax.Array],
    write_pos: jax.Array,
    start: jax.Array,
) -> tuple[jax.Array, list[jax.Array], list[jax.Array]]:
    """One token per row: tokens [B] go to window index write_pos [B] and attend to [start, write_pos].

    Computes what `forward` computes for one token per row (all rows, in order); `layers` comes from
    `decode_params`, the windows from `cache_windows`. Returns logits [B, V] float32 and the windows.
    """
    batch = tokens.shape[0]
    heads, kv_heads, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    group = heads // kv_heads
    attn_len = k_windows[0].shape[2]
    angles = (write_pos - start).astype(jnp.float32)[:, None] * jnp.asarray(rope_inverse_frequencies(cfg))
    cos, sin = jnp.cos(angles)[:, None, :], jnp.sin(angles)[:, None, :]  # [B, 1, hd/2], shared by layers

    def rope(x: jax.Array) -> jax.Array:  # [B, n, hd]
        x32 = x.astype(jnp.float32)
        first, second = jnp.split(x32, 2, axis=-1)
        return jnp.concatenate([first * cos - second * sin, second * cos + first * sin], -1).astype(x.dtype)

    key_index = jnp.arange(attn_len)
    mask = (key_index[None, :] <= write_pos[:, None]) & (key_index[None, :] >= start[:, None])
    mask = mask[:, None, None, :]  # [B, 1, 1, T]
    rows = jnp.arange(batch)
    scale = hd**-0.5
    x = params["embed"][tokens]  # [B, hidden]
    new_k, new_v = [], []
    for layer, k_cache, v_cache in zip(layers, k_windows, v_windows, strict=True):
        qkv = rms_norm(x, layer["attn_norm"], cfg.rms_norm_eps) @ layer["wqkv"]
        if cfg.attention_bias:
            qkv = qkv + layer["bqkv"]
        q, k, v = jnp.split(qkv, [heads * hd, (heads + kv_heads) * hd], axis=-1)
        q = rope(q.reshape(batch, heads, hd)).reshape(batch, kv_heads, group, hd)
        k = rope(k.reshape(batch, kv_heads, hd))
        k_cache = k_cache.at[rows, :, write_pos].set(k.astype(k_cache.dtype), mode="drop")
        v_cache = v_cache.at[rows, :, write_pos].set(
            v.reshape(batch, kv_heads, hd).astype(v_cache.dtype), mode="drop"
        )
        new_k.append(k_cache)
        new_v.append(v_cache)
        scores = jnp.einsum("bkgd,bktd->bkgt", q, k_cache, preferred_element_type=jnp.float32) * scale
        probs = jax.nn.softmax(jnp.where(mask, scores, MASK_VALUE), axis=-1).astype(v_cache.dtype)
        out = jnp.einsum("bkgt,bktd->bkgd", probs, v_cache).reshape(batch, heads * hd)
        x = x + out.astype(x.dtype) @ layer["wo"]
        gate, up = jnp.split(
            rms_norm(x, layer["mlp_norm"], cfg.rms_norm_eps) @ layer["w_gate_up"], 2, axis=-1
        )
        x = x + (jax.nn.silu(gate) * up) @ layer["w_down"]
    x = rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
    head = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
    logits = jnp.matmul(x, head, preferred_element_type=jnp.float32)
    return logits, new_k, new_v


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
    return jax.tree.map(lambda a: jnp.asarray(a, dtype=dtype), params)

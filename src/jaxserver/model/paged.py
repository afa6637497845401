"""The decoder over a paged KV cache: one flat, ragged batch of tokens per call.

A call takes any mix of decode tokens and prompt pieces of many sequences as one flat list: each token with
its position and its sequence, each sequence with its page table (`engine.page_pool`). Attention is one
function of (queries, new keys and values, the pages, the page tables, the tokens' sequences and positions),
so a kernel for another backend can replace it without touching the rest: the CPU kernel
(`cpu_kernels.paged_attention`) or `attention_reference`, written with XLA's operations, which the tests
check the kernel against.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxserver.model import cpu_kernels
from jaxserver.model.config import ModelConfig
from jaxserver.model.llama import (
    MASK_VALUE,
    ROTARY_TABLES,
    Params,
    cache_storage_dtype,
    embed_rows,
    finish_layer,
    from_cache,
    linear,
    project_qkv,
    rms_norm,
    to_cache,
)

PAGE_TOKENS = cpu_kernels.KEY_BLOCK  # a page is one key block of the kernel: 16 positions


class PagedKVCache(NamedTuple):
    """Every layer's pages in one array each: keys [layers, pages, kv_heads, head_dim, PAGE_TOKENS], values
    [layers, pages, kv_heads, PAGE_TOKENS, head_dim]; entries float32, float16, or bfloat16 kept as uint16
    bits (`llama.cache_storage_dtype`). A page's keys lie with its positions along the fast axis, as a query
    multiplies them. One array per kind for all layers: the attention of each layer updates it in place,
    and moving or dropping a page is one operation for the whole model."""

    k: jax.Array
    v: jax.Array

    @property
    def pages(self) -> int:
        return self.k.shape[1]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


def init_paged_cache(
    cfg: ModelConfig, pages: int, dtype: Any, sharding: jax.sharding.Sharding | None = None
) -> PagedKVCache:
    """An empty pool of `pages` pages per layer with entries of `dtype`."""

    def zeros(shape: tuple[int, ...]) -> jax.Array:  # made in place: no copy, no check across processes
        return jnp.zeros(shape, cache_storage_dtype(dtype), device=sharding)

    keys = (cfg.num_layers, pages, cfg.num_kv_heads, cfg.head_dim, PAGE_TOKENS)
    values = (cfg.num_layers, pages, cfg.num_kv_heads, PAGE_TOKENS, cfg.head_dim)
    return PagedKVCache(zeros(keys), zeros(values))


def kernel_fits(cfg: ModelConfig, dtype: Any, sharding: jax.sharding.Sharding | None = None) -> bool:
    """Whether `cpu_kernels.paged_attention` can serve a pool of `dtype` entries placed with `sharding`:
    it is built, takes this model's heads and this dtype, and reads every page whole on one device."""
    split = isinstance(sharding, jax.sharding.NamedSharding) and any(a is not None for a in sharding.spec)
    return (
        cpu_kernels.available()
        and cpu_kernels.takes_heads(cfg.num_heads // cfg.num_kv_heads, cfg.head_dim)
        and cache_storage_dtype(dtype) in cpu_kernels.PAGED_TARGETS
        and not split
    )


# (q, k_new, v_new, k_pages, v_pages, layer, page_table, token_seqs, positions) -> (out, k_pages, v_pages),
# as `cpu_kernels.paged_attention` documents.
Attention = Callable[..., tuple[jax.Array, jax.Array, jax.Array]]


def attention_reference(
    q: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    layer: jax.Array,
    page_table: jax.Array,
    token_seqs: jax.Array,
    positions: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`cpu_kernels.paged_attention` in XLA's operations: every token gathers its sequence's pages whole,
    so it reads (and holds) max_pages pages per token; a reference, and a fallback for small batches."""
    seqs, max_pages = page_table.shape
    pool = k_pages.shape[1]
    valid = (token_seqs >= 0) & (token_seqs < seqs) & (positions >= 0) & (positions < max_pages * PAGE_TOKENS)
    tables = page_table[jnp.clip(token_seqs, 0, seqs - 1)]  # [N, max_pages]
    slot = jnp.clip(positions, 0, max_pages * PAGE_TOKENS - 1)
    page = jnp.take_along_axis(tables, (slot // PAGE_TOKENS)[:, None], axis=1)[:, 0]
    page = jnp.where(valid & (page >= 0), page, pool)  # out of range: the write is dropped
    lane = slot % PAGE_TOKENS
    k_pages = k_pages.at[layer, page, :, :, lane].set(to_cache(k_new, k_pages.dtype), mode="drop")
    v_pages = v_pages.at[layer, page, :, lane, :].set(to_cache(v_new, v_pages.dtype), mode="drop")
    tokens, kv_heads, _, hd = q.shape
    pages = jnp.clip(tables, 0, pool - 1)
    keys = from_cache(k_pages[layer][pages])  # [N, max_pages, kv_heads, hd, PAGE_TOKENS]
    keys = keys.transpose(0, 2, 3, 1, 4).reshape(tokens, kv_heads, hd, max_pages * PAGE_TOKENS)
    values = from_cache(v_pages[layer][pages])  # [N, max_pages, kv_heads, PAGE_TOKENS, hd]
    values = values.transpose(0, 2, 1, 3, 4).reshape(tokens, kv_heads, max_pages * PAGE_TOKENS, hd)
    scores = jnp.einsum("nkgd,nkdt->nkgt", q, keys, preferred_element_type=jnp.float32) * hd**-0.5
    attended = jnp.arange(max_pages * PAGE_TOKENS)[None, :] <= positions[:, None]  # [N, T]
    scores = jnp.where(attended[:, None, None, :], scores, MASK_VALUE)
    out = jnp.einsum("nkgt,nktd->nkgd", jax.nn.softmax(scores, axis=-1), values)
    return jnp.where(valid[:, None, None, None], out, 0.0), k_pages, v_pages


def output_logits(params: Params, hidden: jax.Array) -> jax.Array:
    """Logits [S, V] of final hidden states [S, hidden] (normed by `forward_ragged`)."""
    return linear(hidden, params["lm_head"])


def _rotation(params: Params, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin at positions [N], [1, N, 1, hd/2] each, read from the tables that
    `serving_layout.serving_weights` keeps beside the weights. Computed in the step instead, XLA fuses them into every layer's rotation and
    evaluates them again in each (docs/performance.md, "Rotary tables")."""
    at = jnp.clip(positions, 0, params[ROTARY_TABLES[0]].shape[0] - 1)
    cos, sin = (params[name][at][None, :, None, :] for name in ROTARY_TABLES)
    return cos, sin


def forward_ragged(
    params: Params,
    layers: list[Params],
    cfg: ModelConfig,
    tokens: jax.Array,
    positions: jax.Array,
    token_seqs: jax.Array,
    page_table: jax.Array,
    logit_index: jax.Array,
    cache: PagedKVCache,
    attention: Attention | None = None,
) -> tuple[jax.Array, PagedKVCache]:
    """Run the flat batch tokens [N] (token n of sequence token_seqs[n] at position positions[n]; padding
    tokens have a sequence outside page_table [S, max_pages]) through the decoder, writing their keys and
    values into their pages. `params` and `layers` are `serving_layout.serving_weights` (the head with its
    rotary tables). Returns the final (normed) hidden states [S, hidden] of the tokens at logit_index [S] (each
    sequence's last token in the batch) and the updated cache. `attention` defaults to the CPU kernel where
    it runs, else `attention_reference`. The layers are unrolled: scanned over stacked weights, XLA:CPU ran
    a layer many times slower (docs/performance.md, "Ragged step")."""
    if attention is None:
        attention = cpu_kernels.paged_attention if kernel_fits(cfg, cache.k.dtype) else attention_reference
    heads, kv_heads, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    count = tokens.shape[0]
    cos, sin = _rotation(params, positions)
    x = embed_rows(params["embed"], tokens[None, :])  # [1, N, hidden]: the flat batch as one row
    k_pages, v_pages = cache
    for index, layer in enumerate(layers):
        q, k, v = project_qkv(x, layer, cfg, cos, sin)
        out, k_pages, v_pages = attention(
            q.reshape(count, kv_heads, heads // kv_heads, hd),
            k.reshape(count, kv_heads, hd),
            v.reshape(count, kv_heads, hd),
            k_pages,
            v_pages,
            jnp.int32(index),
            page_table,
            token_seqs,
            positions,
        )
        x = finish_layer(x, out.reshape(1, count, heads * hd), layer, cfg)
    return rms_norm(x[0, logit_index], params["final_norm"], cfg.rms_norm_eps), PagedKVCache(k_pages, v_pages)

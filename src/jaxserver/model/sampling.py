"""Per-row token sampling on device: greedy, temperature, top-k, top-p, each row with its own settings.

A row's randomness comes from its own key folded with the token's position, so a seeded request draws
the same tokens whether it runs alone or beside others.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class SamplingParams(NamedTuple):
    """One entry per batch row."""

    temperature: jax.Array  # [B] float32; rows with greedy set ignore it
    top_p: jax.Array  # [B] float32 in (0, 1]
    top_k: jax.Array  # [B] int32; 0 = no top-k limit
    greedy: jax.Array  # [B] bool
    key: jax.Array  # [B, 2] uint32 raw PRNG keys


def _filtered_logits(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """Scale by temperature and mask tokens outside top-k / top-p with -inf. logits [B, V] float32."""
    vocab = logits.shape[-1]
    scaled = logits / jnp.maximum(params.temperature, 1e-6)[:, None]
    sorted_logits = jnp.sort(scaled, axis=-1)[:, ::-1]  # [B, V] descending
    k = jnp.where(params.top_k > 0, jnp.minimum(params.top_k, vocab), vocab)
    kth_value = jnp.take_along_axis(sorted_logits, (k - 1)[:, None], axis=-1)  # [B, 1]
    sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is < top_p.
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    keep_sorted = (mass_before < params.top_p[:, None]) & (jnp.arange(vocab)[None, :] < k[:, None])
    cutoff = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    threshold = jnp.maximum(cutoff, kth_value)
    return jnp.where(scaled >= threshold, scaled, -jnp.inf)


def sample(logits: jax.Array, params: SamplingParams, positions: jax.Array) -> jax.Array:
    """Pick one token per row. logits [B, V] float32, positions [B] int -> tokens [B] int32."""
    greedy_tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(_: None) -> jax.Array:
        keys = jax.vmap(jax.random.fold_in)(params.key, positions)
        filtered = _filtered_logits(logits, params)
        drawn = jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)
        return jnp.where(params.greedy | (params.temperature <= 0), greedy_tokens, drawn)

    # Sorting the vocabulary costs far more than argmax: skip it when every row is greedy.
    all_greedy = jnp.all(params.greedy | (params.temperature <= 0))
    return jax.lax.cond(all_greedy, lambda _: greedy_tokens, draw, None)

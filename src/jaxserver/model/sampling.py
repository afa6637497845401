"""Per-row token sampling on device: repetition penalties, greedy, temperature, top-k, top-p and min-p,
each row with its own settings; and the log-probabilities a request may ask for.

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
    min_p: jax.Array  # [B] float32; 0 = off
    presence_penalty: jax.Array  # [B] float32; 0 = off
    frequency_penalty: jax.Array  # [B] float32; 0 = off
    repetition_penalty: jax.Array  # [B] float32; 1 = off


class Penalties(NamedTuple):
    """What the repetition penalties look at, per row: [B, vocab]."""

    counts: jax.Array  # int32: occurrences of each token among the generated ones
    in_prompt: jax.Array  # bool: the token occurs in the prompt


def apply_penalties(logits: jax.Array, params: SamplingParams, penalties: Penalties) -> jax.Array:
    """Penalize tokens already seen, as vLLM does: the repetition penalty divides the positive logits (and
    multiplies the negative ones) of tokens in the prompt or the output; presence and frequency penalties
    subtract from the logits of generated tokens, once and once per occurrence."""
    counts = penalties.counts
    generated = counts > 0
    repetition = params.repetition_penalty[:, None]
    repeated = jnp.where(logits > 0, logits / repetition, logits * repetition)
    logits = jnp.where(generated | penalties.in_prompt, repeated, logits)
    return (
        logits
        - params.frequency_penalty[:, None] * counts
        - params.presence_penalty[:, None] * generated.astype(logits.dtype)
    )


def count_tokens(penalties: Penalties, tokens: jax.Array, live: jax.Array) -> Penalties:
    """Add one occurrence of tokens [B] to the rows where live [B] is set."""
    rows = jnp.arange(tokens.shape[0])
    return penalties._replace(counts=penalties.counts.at[rows, tokens].add(live.astype(jnp.int32)))


class LogprobArrays(NamedTuple):
    """Log-probabilities of the model's own distribution (before penalties and sampling filters)."""

    chosen: jax.Array  # [B] float32: of the token picked
    top_ids: jax.Array  # [B, K] int32: the K most likely tokens, most likely first
    top_values: jax.Array  # [B, K] float32


def token_logprobs(logits: jax.Array, tokens: jax.Array, top: int) -> LogprobArrays:
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    top_values, top_ids = jax.lax.top_k(logprobs, top)
    return LogprobArrays(chosen, top_ids.astype(jnp.int32), top_values)


def _filtered_logits(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """Scale by temperature and mask tokens outside top-k / top-p / min-p with -inf. logits [B, V] float32."""
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
    # min-p: a token stays if its probability is at least min_p times the largest one.
    min_p_floor = sorted_logits[:, :1] + jnp.log(jnp.maximum(params.min_p, 1e-30))[:, None]
    min_p_floor = jnp.where(params.min_p[:, None] > 0, min_p_floor, -jnp.inf)
    threshold = jnp.maximum(jnp.maximum(cutoff, kth_value), min_p_floor)
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

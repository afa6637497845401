"""Per-row token sampling on device: repetition penalties, greedy, temperature, top-k, top-p and min-p,
each row with its own settings; and the log-probabilities a request may ask for.

A row's randomness comes from its own key folded with the token's position, so a seeded request draws
the same tokens whether it runs alone or beside others.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class SamplingArrays(NamedTuple):
    """The sampling settings of a batch as arrays, one entry per row (a request's options are
    `engine.request.SamplingOptions`)."""

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
    """What the repetition penalties look at, and the logit bias, per row: [B, vocab]."""

    counts: jax.Array  # int32: occurrences of each token among the generated ones
    in_prompt: jax.Array  # bool: the token occurs in the prompt
    bias: jax.Array  # float32: added to the logits (a request's logit_bias)


def apply_penalties(logits: jax.Array, params: SamplingArrays, penalties: Penalties) -> jax.Array:
    """Penalize tokens already seen, as vLLM does: the repetition penalty divides the positive logits (and
    multiplies the negative ones) of tokens in the prompt or the output; presence and frequency penalties
    subtract from the logits of generated tokens, once and once per occurrence. Then add the bias."""
    counts = penalties.counts
    generated = counts > 0
    repetition = params.repetition_penalty[:, None]
    repeated = jnp.where(logits > 0, logits / repetition, logits * repetition)
    logits = jnp.where(generated | penalties.in_prompt, repeated, logits)
    return (
        logits
        - params.frequency_penalty[:, None] * counts
        - params.presence_penalty[:, None] * generated.astype(logits.dtype)
        + penalties.bias
    )


def apply_token_mask(logits: jax.Array, allowed: jax.Array) -> jax.Array:
    """Logits [B, V] with the tokens a bitmask [B, ceil(V / 32)] int32 leaves out set to -inf (bit t & 31
    of word t >> 5 allows token t, as llguidance writes it)."""
    bits = (allowed[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1
    keep = bits.reshape(allowed.shape[0], -1)[:, : logits.shape[-1]].astype(bool)
    return jnp.where(keep, logits, -jnp.inf)


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


# Sampling looks first at the CANDIDATES most likely tokens of each row: a top-k partial sort of the
# vocabulary is far cheaper on the CPU than a full sort (docs/performance.md), and the tokens that top-k,
# top-p or min-p keep almost always lie among them. Rows whose kept set reaches further (a flat
# distribution under top-p, top_k above CANDIDATES, or no filter at all) are sampled over the whole
# vocabulary instead.
CANDIDATES = 256
THRESHOLD_SEARCH_STEPS = 24  # bisection halvings: the cutoff to about 1e-7 of the logits' range


def _inverse_cdf(probs: jax.Array, uniform: jax.Array, block: int = 256) -> jax.Array:
    """Index drawn from unnormalised probs [B, N] with one uniform [B] in [0, 1) per row. Over more than
    `block` entries it picks a block by its mass, then an entry inside it: a running sum over the whole
    vocabulary is much slower on the CPU (docs/performance.md)."""
    rows, n = probs.shape
    if n <= block:
        return _first_crossing(probs, uniform)
    blocks = jnp.pad(probs, ((0, 0), (0, -n % block))).reshape(rows, -1, block)
    block_mass = blocks.sum(axis=-1)
    chosen = _first_crossing(block_mass, uniform)
    mass_before = jnp.sum(jnp.where(jnp.arange(block_mass.shape[1]) < chosen[:, None], block_mass, 0.0), -1)
    inside = jnp.take_along_axis(blocks, chosen[:, None, None], axis=1)[:, 0]
    total = block_mass.sum(axis=-1)
    picked_mass = jnp.take_along_axis(block_mass, chosen[:, None], axis=1)[:, 0]
    # Where the uniform fell inside the chosen block, rescaled to [0, 1).
    rest = jnp.clip((uniform * total - mass_before) / picked_mass, 0.0, 1.0)
    return chosen * block + _first_crossing(inside, rest)


def _first_crossing(probs: jax.Array, uniform: jax.Array) -> jax.Array:
    """The first index whose cumulative mass exceeds uniform * total, or the last nonzero one when
    rounding overshoots. probs [B, N], uniform [B]."""
    cumulative = jnp.cumsum(probs, axis=-1)
    crossed = cumulative > (uniform * cumulative[:, -1])[:, None]
    last_kept = probs.shape[-1] - 1 - jnp.argmax(probs[:, ::-1] > 0, axis=-1)
    return jnp.where(crossed.any(axis=-1), jnp.argmax(crossed, axis=-1), last_kept).astype(jnp.int32)


def _search_cutoffs(
    scaled: jax.Array, probs: jax.Array, top_p: jax.Array, k: jax.Array, upper: jax.Array
) -> jax.Array:
    """Per row, the largest logit t with mass(scaled >= t) >= top_p or count(scaled >= t) >= k: the
    stricter of the top-p and top-k cutoffs of a full sort, found by bisection below `upper`, a value
    where neither holds. scaled and probs [B, V]; the rest [B]."""

    def holds(t: jax.Array) -> jax.Array:
        kept = scaled >= t[:, None]
        mass = jnp.sum(jnp.where(kept, probs, 0.0), axis=-1)
        # Either cutoff alone would keep everything above t, so the stricter one is the larger t where
        # either holds. top_p 1 sets no cutoff, whatever the rounding of the mass.
        return ((mass >= top_p) & (top_p < 1)) | (jnp.sum(kept, axis=-1) >= k)

    def halve(_: int, bounds: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        low, high = bounds
        middle = (low + high) / 2
        ok = holds(middle)
        return jnp.where(ok, middle, low), jnp.where(ok, high, middle)

    low = jnp.min(scaled, axis=-1)  # keeps everything, so the predicate holds
    low, _ = jax.lax.fori_loop(0, THRESHOLD_SEARCH_STEPS, halve, (low, upper))
    return low


def _draw(scaled: jax.Array, params: SamplingArrays, uniform: jax.Array) -> jax.Array:
    """One token per row from temperature-scaled logits [B, V], keeping only what top-k, top-p and
    min-p allow (all three: the shortest of their prefixes of the sorted vocabulary)."""
    vocab = scaled.shape[-1]
    n = min(CANDIDATES, vocab)
    top_values, top_ids = jax.lax.top_k(scaled, n)  # [B, n], most likely first
    # The first and last candidates are taken with max and min, not slices: XLA folds a slice of the
    # values into the top-k, and the CPU backend then sorts the whole vocabulary (docs/performance.md).
    best, last_candidate = top_values.max(axis=-1), top_values.min(axis=-1)
    log_norm = jax.nn.logsumexp(scaled, axis=-1, keepdims=True)
    top_probs = jnp.exp(top_values - log_norm)
    k = jnp.where(params.top_k > 0, jnp.minimum(params.top_k, vocab), vocab)
    # min-p: a token stays if its probability is at least min_p times the largest one.
    floor = best + jnp.log(jnp.maximum(params.min_p, 1e-30))
    floor = jnp.where(params.min_p > 0, floor, -jnp.inf)

    # A token stays in the top-p prefix if the mass before it is < top_p.
    mass_before = jnp.cumsum(top_probs, axis=-1) - top_probs
    keep = (mass_before < params.top_p[:, None]) & (jnp.arange(n) < k[:, None])
    keep &= top_values >= floor[:, None]
    candidate_tokens = jnp.take_along_axis(
        top_ids, _inverse_cdf(jnp.where(keep, top_probs, 0.0), uniform)[:, None], axis=-1
    )[:, 0]
    covered = (
        (k <= n)
        | ((params.top_p < 1) & (jnp.sum(top_probs, axis=-1) >= params.top_p))
        | (last_candidate < floor)
    )
    if n == vocab:
        return candidate_tokens

    def whole_vocabulary(_: None) -> jax.Array:
        probs = jnp.exp(scaled - log_norm)
        # Only rows that are not covered need a cutoff below their candidates; the rest keep everything
        # here (their token comes from the candidates).
        searched = ~covered & ((params.top_p < 1) | (k < vocab))
        cutoff = jax.lax.cond(
            jnp.any(searched),
            lambda _: _search_cutoffs(scaled, probs, params.top_p, k, last_candidate),
            lambda _: jnp.full(uniform.shape, -jnp.inf),
            None,
        )
        threshold = jnp.maximum(jnp.where(searched, cutoff, -jnp.inf), floor)
        return _inverse_cdf(jnp.where(scaled >= threshold[:, None], probs, 0.0), uniform)

    # A row's token depends only on its own logits and settings, whichever branch the batch takes.
    full_tokens = jax.lax.cond(jnp.all(covered), lambda _: candidate_tokens, whole_vocabulary, None)
    return jnp.where(covered, candidate_tokens, full_tokens)


def argmax_rows(logits: jax.Array) -> jax.Array:
    """jnp.argmax(logits, -1) (the first index of each row's maximum) as two plain reductions, a max and a
    min over the indices that reach it, which XLA:CPU vectorizes; its own argmax reduces (value, index)
    pairs one element at a time, which is much slower (docs/performance.md). A row with a NaN
    gets its last index instead of the NaN's."""
    vocab = logits.shape[-1]
    top = logits.max(axis=-1, keepdims=True)
    first = jnp.min(jnp.where(logits == top, jnp.arange(vocab, dtype=jnp.int32), vocab), axis=-1)
    return jnp.minimum(first, vocab - 1)


def sample(logits: jax.Array, params: SamplingArrays, positions: jax.Array) -> jax.Array:
    """Pick one token per row. logits [B, V] float32, positions [B] int -> tokens [B] int32."""
    greedy_tokens = argmax_rows(logits)

    def draw(_: None) -> jax.Array:
        keys = jax.vmap(jax.random.fold_in)(params.key, positions)
        uniform = jax.vmap(jax.random.uniform)(keys)
        scaled = logits / jnp.maximum(params.temperature, 1e-6)[:, None]
        drawn = _draw(scaled, params, uniform)
        return jnp.where(params.greedy | (params.temperature <= 0), greedy_tokens, drawn)

    # Greedy rows need only the argmax: skip the rest when every row is greedy.
    all_greedy = jnp.all(params.greedy | (params.temperature <= 0))
    return jax.lax.cond(all_greedy, lambda _: greedy_tokens, draw, None)

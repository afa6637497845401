"""The device programs the runner compiles, as pure functions: the ragged step's forward pass, the
sampler (compiled once, apart from it), and multi-step decoding; and the shapes they are compiled for."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.experimental
import jax.numpy as jnp
import numpy as np

from jaxserver.engine.request import MAX_TOP_LOGPROBS
from jaxserver.model import paged
from jaxserver.model.config import ModelConfig
from jaxserver.model.llama import Params
from jaxserver.model.sampling import (
    LogprobArrays,
    Penalties,
    SamplingArrays,
    apply_penalties,
    apply_token_mask,
    sample,
    token_logprobs,
)

MIN_TOKEN_BUCKET = 8


def bucket(n: int, minimum: int, cap: int) -> int:
    """Smallest power of two >= n (and >= minimum), but never above cap."""
    size = minimum
    while size < n:
        size *= 2
    return min(size, cap)


def fine_bucket(n: int, minimum: int, cap: int) -> int:
    """Smallest power of two or 1.5 times one (8, 12, 16, 24, 32, 48, ...) >= n and >= minimum, never above
    cap: padding wastes at most a third of the work, for twice the shapes of `bucket`."""
    size = bucket(n, minimum, cap)
    three_quarters = size * 3 // 4
    return three_quarters if n <= three_quarters and three_quarters >= minimum else size


def sampling_rows(
    rows: int,
    *,
    temperature: float,
    top_p: float,
    top_k: int,
    greedy: bool,
    seed: int,
    min_p: float = 0.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    repetition_penalty: float = 1.0,
) -> SamplingArrays:
    """Host arrays of `rows` rows of the same sampling settings."""
    key = np.asarray(jax.random.key_data(jax.random.key(seed, impl="threefry2x32")), np.uint32)
    return SamplingArrays(
        temperature=np.full((rows,), temperature, np.float32),
        top_p=np.full((rows,), top_p, np.float32),
        top_k=np.full((rows,), top_k, np.int32),
        greedy=np.full((rows,), greedy),
        key=np.tile(key, (rows, 1)),
        min_p=np.full((rows,), min_p, np.float32),
        presence_penalty=np.full((rows,), presence_penalty, np.float32),
        frequency_penalty=np.full((rows,), frequency_penalty, np.float32),
        repetition_penalty=np.full((rows,), repetition_penalty, np.float32),
    )


class DecodeState(NamedTuple):
    """The rows of a multi-step decode call; every field is [rows]."""

    tokens: jax.Array  # int32: the last token, fed to the next step
    lengths: jax.Array  # int32: its position (where its key and value are written)
    remaining: jax.Array  # int32: tokens the row may still generate
    active: jax.Array  # bool
    stop_at_eos: jax.Array  # bool: False for requests that ignore EOS (benchmarks)
    sampling: SamplingArrays


class StepOutputs(NamedTuple):
    """One ragged step's results, one row per piece (padding rows after them)."""

    tokens: jax.Array  # [S] int32: the token sampled after each piece's last token
    logprobs: LogprobArrays  # [S, ...] of the model's distribution at that token


def forward_step(
    params: Params,
    layers: list[Params],
    cache: paged.PagedKVCache,
    tokens: jax.Array,
    positions: jax.Array,
    token_seqs: jax.Array,
    page_table: jax.Array,
    logit_index: jax.Array,
    *,
    cfg: ModelConfig,
    attention: paged.Attention,
    rows_out: int,
) -> tuple[jax.Array, paged.PagedKVCache]:
    """The final hidden states after each sequence's last token in the batch, padded to [rows_out, hidden]
    (what `sample_step` takes whatever the step's size), and the cache with the step's tokens written."""
    hidden, cache = paged.forward_ragged(
        params, layers, cfg, tokens, positions, token_seqs, page_table, logit_index, cache, attention
    )
    return jnp.pad(hidden, ((0, rows_out - hidden.shape[0]), (0, 0))), cache


def sample_step(
    params: Params,
    hidden: jax.Array,
    penalties: Penalties,
    sampling: SamplingArrays,
    rows: jax.Array,
    samples: jax.Array,
    positions: jax.Array,
    allowed: jax.Array,
    penalize: jax.Array,
    constrain: jax.Array,
    want_logprobs: jax.Array,
) -> tuple[StepOutputs, Penalties]:
    """The next token after each of the first R rows of hidden [max_num_seqs, hidden] (meaningful where
    `samples` [R] is set) at `positions` [R], after the repetition penalties of its sequence's row `rows`
    [R] of `penalties` when `penalize`, and among the tokens the bitmask `allowed` [R, ceil(vocab / 32)]
    keeps when `constrain`; the sampled tokens counted there. Compiled apart from the forward
    pass, by R alone: the output projection and sampling cost per row, so a step samples only a bucket
    of the rows it has (and sampling's many small operations cost XLA more to compile than the layers)."""
    logits = paged.output_logits(params, hidden[: rows.shape[0]])
    penalized = jax.lax.cond(
        penalize,
        lambda: apply_penalties(logits, sampling, Penalties(*(part[rows] for part in penalties))),
        lambda: logits,
    )
    masked = jax.lax.cond(constrain, lambda: apply_token_mask(penalized, allowed), lambda: penalized)
    next_tokens = sample(masked, sampling, positions=positions)
    counted = penalties.counts.at[rows, next_tokens].add(samples.astype(jnp.int32))

    def no_logprobs() -> LogprobArrays:
        top = (logits.shape[0], MAX_TOP_LOGPROBS)
        return LogprobArrays(jnp.zeros(logits.shape[0]), jnp.zeros(top, jnp.int32), jnp.zeros(top))

    logprobs = jax.lax.cond(
        want_logprobs, lambda: token_logprobs(logits, next_tokens, MAX_TOP_LOGPROBS), no_logprobs
    )
    return StepOutputs(next_tokens, logprobs), penalties._replace(counts=counted)


def _advanced(state: DecodeState, new_tokens: jax.Array, eos_ids: jax.Array, max_length: int) -> DecodeState:
    """`state` after its active rows took `new_tokens` [R]: longer by one, and inactive where EOS, the
    token budget or the context finished them."""
    live = state.active
    lengths = state.lengths + live
    remaining = state.remaining - live
    finished = (
        (jnp.isin(new_tokens, eos_ids) & state.stop_at_eos) | (remaining <= 0) | (lengths + 1 >= max_length)
    )
    return state._replace(
        tokens=jnp.where(live, new_tokens, state.tokens),
        lengths=lengths,
        remaining=remaining,
        active=live & ~finished,
    )


def decode_steps(
    params: Params,
    layers: list[Params],
    cache: paged.PagedKVCache,
    state: DecodeState,
    page_table: jax.Array,
    eos_ids: jax.Array,
    steps: jax.Array,
    *,
    cfg: ModelConfig,
    attention: paged.Attention,
    max_steps: int,
    max_length: int,
    report_step: Callable[[jax.Array, jax.Array], None] | None = None,
    report_done: Callable[[jax.Array], None] | None = None,
) -> tuple[jax.Array, jax.Array, paged.PagedKVCache]:
    """Up to `steps` (<= max_steps) decode steps of the rows of `state` [R] (row r is sequence r of
    page_table [R, max_pages], whose pages hold room for them), fewer if a row finishes first. Returns
    the tokens generated [R, max_steps], where each was generated (bool, same shape), and the cache.
    `report_step(tokens, active)` is called on the host after each step, `report_done(steps)` after the
    last (`step_relay`)."""
    rows = state.tokens.shape[0]
    seq_ids = jnp.arange(rows, dtype=jnp.int32)

    def step(carry):
        i, state, cache, tokens, emitted = carry
        token_seqs = jnp.where(state.active, seq_ids, rows)  # a finished row is padding: writes nothing
        hidden, cache = paged.forward_ragged(
            params,
            layers,
            cfg,
            state.tokens,
            state.lengths,
            token_seqs,
            page_table,
            seq_ids,
            cache,
            attention,
        )
        logits = paged.output_logits(params, hidden)
        new_tokens = sample(logits, state.sampling, positions=state.lengths + 1)
        emitted = emitted.at[:, i].set(state.active)
        if report_step is not None:
            jax.experimental.io_callback(report_step, None, new_tokens, state.active)
        state = _advanced(state, new_tokens, eos_ids, max_length)
        return i + 1, state, cache, tokens.at[:, i].set(new_tokens), emitted

    started_active = state.active

    def keep_going(carry) -> jax.Array:
        # The call ends at the step where a row finishes, so that its client has its end at once and its
        # row and pages are free for a waiting request.
        i, state = carry[0], carry[1]
        return (i < steps) & jnp.any(state.active) & jnp.all(state.active == started_active)

    tokens = jnp.zeros((rows, max_steps), jnp.int32)
    emitted = jnp.zeros((rows, max_steps), bool)
    steps_run, _, cache, tokens, emitted = jax.lax.while_loop(
        keep_going, step, (0, state, cache, tokens, emitted)
    )
    if report_done is not None:
        jax.experimental.io_callback(report_done, None, steps_run)
    return tokens, emitted, cache


def idle_rows(rows: int) -> DecodeState:
    """Host arrays of `rows` inactive decode rows."""
    return DecodeState(
        tokens=np.zeros(rows, np.int32),
        lengths=np.zeros(rows, np.int32),
        remaining=np.zeros(rows, np.int32),
        active=np.zeros(rows, bool),
        stop_at_eos=np.ones(rows, bool),
        sampling=sampling_rows(rows, temperature=1.0, top_p=1.0, top_k=0, greedy=True, seed=0),
    )


def decode_rows(n: int, cap: int) -> int:
    """Rows a decode call computes for n sequences: powers of two up to 8, then also 1.5 times one (12, 24,
    48, ...), so that padding rows, which cost as much as real ones, waste at most a third."""
    return bucket(n, 1, cap) if n <= 8 else fine_bucket(n, 8, cap)

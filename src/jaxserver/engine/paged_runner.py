"""The device side over a paged KV cache (issue 19; the engine does not use it yet): the pool of pages, and one
compiled ragged step that computes a `StepPlan`'s pieces and samples each finished piece's next token.

A step's flat batch is padded to a token bucket and its sequences to a row bucket, so the compiled shapes
are a few (tokens, rows) pairs whatever mix of prompts and decode tokens arrives. Padding tokens belong to
no sequence: they read and write nothing. A step of decode tokens only may run several steps in one call
(`decode`), each feeding the token the last one sampled, until a row finishes: Python is entered once per
chunk, which is where multi-step decoding pays.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxserver.engine.paged_scheduler import StepPlan
from jaxserver.engine.request import MAX_TOP_LOGPROBS, SamplingOptions, TokenLogprobs
from jaxserver.engine.runner import ChunkOutputs, DecodeState, _advanced, _no_outputs, bucket, sampling_rows
from jaxserver.model import llama, paged
from jaxserver.model.config import ModelConfig
from jaxserver.model.llama import Params
from jaxserver.model.sampling import (
    LogprobArrays,
    Penalties,
    SamplingArrays,
    apply_penalties,
    sample,
    token_logprobs,
)

MIN_TOKEN_BUCKET = 8


class StepOutputs(NamedTuple):
    """One ragged step's results, one row per piece (padding rows after them)."""

    tokens: jax.Array  # [S] int32: the token sampled after each piece's last token
    logprobs: LogprobArrays | None  # [S, ...] when asked for


def _ragged_step(
    params: Params,
    layers: list[Params],
    cache: paged.PagedKVCache,
    penalties: Penalties | None,
    tokens: jax.Array,
    positions: jax.Array,
    token_seqs: jax.Array,
    page_table: jax.Array,
    logit_index: jax.Array,
    sampling: SamplingArrays,
    rows: jax.Array,
    samples: jax.Array,
    *,
    cfg: ModelConfig,
    want_logprobs: bool,
) -> tuple[StepOutputs, paged.PagedKVCache, Penalties | None]:
    """The next token [S] of each of the step's sequences (meaningful where `samples` [S] is set: its piece
    reaches its end), sampled from the logits after its last token in the batch, and the cache with the
    pieces written. With `penalties` (all rows; a sequence's is row `rows` [S]), the logits are penalized
    first and the sampled tokens counted."""
    logits, cache = paged.forward_ragged(
        params, layers, cfg, tokens, positions, token_seqs, page_table, logit_index, cache
    )
    raw_logits = logits
    if penalties is not None:
        logits = apply_penalties(
            logits, sampling, Penalties(penalties.counts[rows], penalties.in_prompt[rows])
        )
    next_tokens = sample(logits, sampling, positions=positions[logit_index] + 1)
    if penalties is not None:
        counted = penalties.counts.at[rows, next_tokens].add(samples.astype(jnp.int32))
        penalties = penalties._replace(counts=counted)
    logprobs = token_logprobs(raw_logits, next_tokens, MAX_TOP_LOGPROBS) if want_logprobs else None
    return StepOutputs(next_tokens, logprobs), cache, penalties


def _decode_steps(
    params: Params,
    layers: list[Params],
    cache: paged.PagedKVCache,
    state: DecodeState,
    page_table: jax.Array,
    eos_ids: jax.Array,
    steps: jax.Array,
    *,
    cfg: ModelConfig,
    max_steps: int,
    max_length: int,
) -> tuple[ChunkOutputs, paged.PagedKVCache]:
    """Up to `steps` (<= max_steps) decode steps of the rows of `state` [R] (row r is sequence r of
    page_table [R, max_pages], whose pages hold room for them), fewer if a row finishes first. Returns
    the tokens generated per row and step, and the cache."""
    rows = state.tokens.shape[0]
    seq_ids = jnp.arange(rows, dtype=jnp.int32)

    def step(carry):
        i, state, cache, outputs = carry
        token_seqs = jnp.where(state.active, seq_ids, rows)  # a finished row is padding: writes nothing
        logits, cache = paged.forward_ragged(
            params, layers, cfg, state.tokens, state.lengths, token_seqs, page_table, seq_ids, cache
        )
        new_tokens = sample(logits, state.sampling, positions=state.lengths + 1)
        emitted = outputs.emitted.at[:, i].set(state.active)
        state = _advanced(state, new_tokens, eos_ids, max_length)
        return i + 1, state, cache, ChunkOutputs(outputs.tokens.at[:, i].set(new_tokens), emitted, None)

    started_active = state.active

    def keep_going(carry) -> jax.Array:
        # As the slot engine's chunk: it ends at the step where a row finishes, which frees it at once.
        i, state = carry[0], carry[1]
        return (i < steps) & jnp.any(state.active) & jnp.all(state.active == started_active)

    outputs = _no_outputs(rows, max_steps, want_logprobs=False)
    _, _, cache, outputs = jax.lax.while_loop(keep_going, step, (0, state, cache, outputs))
    return outputs, cache


class PagedRunner:
    """Owns the parameters on device, the pool's pages and the compiled ragged step."""

    def __init__(
        self,
        cfg: ModelConfig,
        params: Params,
        *,
        pages: int,
        max_num_seqs: int,
        max_length: int,
        cache_dtype: jnp.dtype,
        max_num_batched_tokens: int,
        max_decode_steps: int = 1,
        eos_ids: tuple[int, ...] = (),
    ):
        self.cfg = cfg
        self.params, self.layers = llama.serving_weights(params, cfg)
        self.max_num_seqs = max_num_seqs
        self.max_pages = -(-max_length // paged.PAGE_TOKENS)
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_length = max_length
        self.max_decode_steps = max_decode_steps
        self.eos_ids = np.asarray(eos_ids, np.int32)
        self.cache = paged.init_paged_cache(cfg, pages, cache_dtype)
        self._step = jax.jit(
            functools.partial(_ragged_step, cfg=cfg), static_argnames="want_logprobs", donate_argnums=(2, 3)
        )
        # Repetition penalties look at every row's counts; only rows of penalized requests are kept.
        vocab = cfg.vocab_size
        self.penalties = Penalties(
            jnp.zeros((max_num_seqs, vocab), jnp.int32), jnp.zeros((max_num_seqs, vocab), bool)
        )
        self._decode = jax.jit(
            functools.partial(_decode_steps, cfg=cfg, max_steps=max_decode_steps, max_length=max_length),
            donate_argnums=2,
        )
        # Each row's sampling settings as host arrays, set when another request takes the row.
        self._sampling = sampling_rows(max_num_seqs, temperature=1.0, top_p=1.0, top_k=0, greedy=True, seed=0)
        self._row_owners: list[tuple[str, int] | None] = [None] * max_num_seqs

    def shape(self, plan: StepPlan) -> tuple[int, int]:
        """The compiled (tokens, rows) shape a plan runs in: powers of two."""
        tokens = bucket(plan.tokens, MIN_TOKEN_BUCKET, max(self.max_num_batched_tokens, MIN_TOKEN_BUCKET))
        return tokens, bucket(len(plan.pieces), 1, self.max_num_seqs)

    def step(self, plan: StepPlan) -> dict[int, tuple[int, TokenLogprobs | None]]:
        """Compute the plan's pieces; the sampled next token (and its logprobs, when the request asked) of
        every piece that reaches its sequence's end, by the piece's index in the plan."""
        token_count, rows = self.shape(plan)
        tokens = np.zeros(token_count, np.int32)
        positions = np.zeros(token_count, np.int32)
        token_seqs = np.full(token_count, rows, np.int32)  # padding: a sequence past the table
        page_table = np.full((rows, self.max_pages), -1, np.int32)  # -1: no page (the kernel skips it)
        logit_index = np.zeros(rows, np.int32)
        seq_rows = np.zeros(rows, np.int32)
        samples = np.zeros(rows, bool)
        at = 0
        for row, piece in enumerate(plan.pieces):
            count = piece.end - piece.start
            tokens[at : at + count] = piece.seq.tokens[piece.start : piece.end]
            positions[at : at + count] = np.arange(piece.start, piece.end)
            token_seqs[at : at + count] = row
            indices = piece.seq.table.indices
            page_table[row, : len(indices)] = indices
            logit_index[row] = at + count - 1
            seq_rows[row], samples[row] = piece.seq.row, piece.samples
            at += count
        sampling = self._rows_sampling(plan, rows)
        requests = [piece.seq.request for piece in plan.pieces]
        penalize = any(request.sampling.penalized for request in requests)
        outputs, self.cache, penalties = self._step(
            self.params,
            self.layers,
            self.cache,
            self.penalties if penalize else None,
            tokens,
            positions,
            token_seqs,
            page_table,
            logit_index,
            sampling,
            seq_rows,
            samples,
            want_logprobs=any(request.logprobs is not None for request in requests),
        )
        if penalties is not None:
            self.penalties = penalties
        outputs = jax.device_get(outputs)
        return {
            i: (int(outputs.tokens[i]), _listed(outputs, i, piece.seq.request.logprobs))
            for i, piece in enumerate(plan.pieces)
            if piece.samples
        }

    def decode(self, plan: StepPlan, steps: int) -> dict[int, list[int]]:
        """Up to `steps` (at most `max_decode_steps`) decode steps of a plan of decode tokens only, whose
        sequences' pages have room for them (`PagedScheduler.reserve`); the tokens each piece generated, by
        its index in the plan. It stops early at the step where a sequence ends (EOS, its token budget, the
        context). Repetition penalties and logprobs are `step`'s only."""
        if any(p.seq.request.sampling.penalized or p.seq.request.logprobs is not None for p in plan.pieces):
            raise ValueError("decode runs no repetition penalties and no logprobs; step such plans")
        if not all(piece.end - piece.start == 1 and piece.samples for piece in plan.pieces):
            raise ValueError("decode takes plans of decode tokens only (one token per sequence, at its end)")
        steps = min(steps, self.max_decode_steps)
        rows = bucket(len(plan.pieces), 1, self.max_num_seqs)
        state = DecodeState(
            tokens=np.zeros(rows, np.int32),
            lengths=np.zeros(rows, np.int32),
            starts=np.zeros(rows, np.int32),
            remaining=np.zeros(rows, np.int32),
            active=np.zeros(rows, bool),
            stop_at_eos=np.ones(rows, bool),
            sampling=self._rows_sampling(plan, rows),
        )
        page_table = np.full((rows, self.max_pages), -1, np.int32)  # -1: no page (the kernel skips it)
        for row, piece in enumerate(plan.pieces):
            seq, request = piece.seq, piece.seq.request
            state.tokens[row], state.lengths[row] = seq.tokens[piece.start], piece.start
            state.remaining[row] = request.max_new_tokens - len(seq.generated)
            state.active[row], state.stop_at_eos[row] = True, not request.ignore_eos
            page_table[row, : len(seq.table.pages)] = seq.table.indices
        outputs, self.cache = self._decode(
            self.params, self.layers, self.cache, state, page_table, self.eos_ids, np.int32(steps)
        )
        tokens, emitted = np.asarray(outputs.tokens), np.asarray(outputs.emitted)
        return {i: tokens[i][emitted[i]].tolist() for i in range(len(plan.pieces))}

    def _start_penalties(self, row: int, prompt: list[int], generated: list[int]) -> None:
        """Row `row`'s penalties from the tokens a sequence holds (a resumed one has generated some)."""
        counts = np.bincount(np.asarray(generated, np.int64), minlength=self.cfg.vocab_size).astype(np.int32)
        in_prompt = np.zeros(self.cfg.vocab_size, bool)
        in_prompt[prompt] = True
        self.penalties = Penalties(
            self.penalties.counts.at[row].set(counts), self.penalties.in_prompt.at[row].set(in_prompt)
        )

    def _rows_sampling(self, plan: StepPlan, rows: int) -> SamplingArrays:
        """The plan's sequences' sampling settings, one row per piece (padding rows as row 0's)."""
        for piece in plan.pieces:
            seq = piece.seq
            # A resumed sequence counts as new: its row may be another, or hold counts of its earlier stay.
            owner = (seq.request.request_id, seq.preemptions)
            if self._row_owners[seq.row] != owner:
                _set_row(self._sampling, seq.row, seq.request.sampling)
                if seq.request.sampling.penalized:
                    self._start_penalties(seq.row, seq.request.prompt_ids, seq.generated)
                self._row_owners[seq.row] = owner
        order = np.zeros(rows, np.int32)
        order[: len(plan.pieces)] = [piece.seq.row for piece in plan.pieces]
        return SamplingArrays(*(column[order] for column in self._sampling))


def _listed(outputs: StepOutputs, row: int, top: int | None) -> TokenLogprobs | None:
    """Row `row`'s logprobs with its `top` alternatives, when the request asked for them."""
    if top is None or outputs.logprobs is None:
        return None
    chosen, top_ids, top_values = outputs.logprobs
    pairs = list(zip(top_ids[row, :top].tolist(), top_values[row, :top].tolist(), strict=True))
    return TokenLogprobs(int(outputs.tokens[row]), float(chosen[row]), pairs)


def _set_row(sampling: SamplingArrays, row: int, options: SamplingOptions) -> None:
    """Row `row` of the host arrays `sampling` set to a request's options."""
    one = sampling_rows(1, **vars(options))
    for column, value in zip(sampling, one, strict=True):
        column[row] = value[0]

"""The device side over a paged KV cache: the pool's pages, one compiled ragged step that computes a
`StepPlan`'s pieces and samples each finished piece's next token, and multi-step decoding.

A step's flat batch is padded to a token bucket, and its rows (one per sequence) to a fixed function of
that bucket, so the compiled shapes are a dozen token counts whatever mix of prompts and decode tokens
arrives. Padding tokens belong to no sequence: they read and write nothing. A step of decode tokens only
may run several steps in one call (`decode`), each feeding the token the last one sampled, until a row
finishes: Python is entered once per chunk, which is where multi-step decoding pays. Every shape is
compiled by `warm_up`, before the server reports ready.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxserver.engine.request import MAX_TOP_LOGPROBS, SamplingOptions, TokenLogprobs
from jaxserver.engine.scheduler import StepPlan
from jaxserver.model import cpu_kernels, llama, paged
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

log = logging.getLogger(__name__)

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


def _forward_step(
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
    """The logits after each sequence's last token in the batch, padded to [rows_out, V] (what
    `_sample_step` takes whatever the step's size), and the cache with the step's tokens written."""
    logits, cache = paged.forward_ragged(
        params, layers, cfg, tokens, positions, token_seqs, page_table, logit_index, cache, attention
    )
    return jnp.pad(logits, ((0, rows_out - logits.shape[0]), (0, 0))), cache


def _sample_step(
    logits: jax.Array,
    penalties: Penalties,
    sampling: SamplingArrays,
    rows: jax.Array,
    samples: jax.Array,
    positions: jax.Array,
    penalize: jax.Array,
    want_logprobs: jax.Array,
) -> tuple[StepOutputs, Penalties]:
    """The next token of each row of logits [R, V] (meaningful where `samples` [R] is set) at `positions`
    [R], after the repetition penalties of its sequence's row `rows` [R] of `penalties` when `penalize`;
    the sampled tokens counted there. Compiled once, apart from the forward pass: sampling's many small
    operations cost XLA more to compile than the 30 layers do."""
    penalized = jax.lax.cond(
        penalize,
        lambda: apply_penalties(
            logits, sampling, Penalties(penalties.counts[rows], penalties.in_prompt[rows])
        ),
        lambda: logits,
    )
    next_tokens = sample(penalized, sampling, positions=positions)
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
    attention: paged.Attention,
    max_steps: int,
    max_length: int,
) -> tuple[jax.Array, jax.Array, paged.PagedKVCache]:
    """Up to `steps` (<= max_steps) decode steps of the rows of `state` [R] (row r is sequence r of
    page_table [R, max_pages], whose pages hold room for them), fewer if a row finishes first. Returns
    the tokens generated [R, max_steps], where each was generated (bool, same shape), and the cache."""
    rows = state.tokens.shape[0]
    seq_ids = jnp.arange(rows, dtype=jnp.int32)

    def step(carry):
        i, state, cache, tokens, emitted = carry
        token_seqs = jnp.where(state.active, seq_ids, rows)  # a finished row is padding: writes nothing
        logits, cache = paged.forward_ragged(
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
        new_tokens = sample(logits, state.sampling, positions=state.lengths + 1)
        emitted = emitted.at[:, i].set(state.active)
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
    _, _, cache, tokens, emitted = jax.lax.while_loop(keep_going, step, (0, state, cache, tokens, emitted))
    return tokens, emitted, cache


def attention_for(cfg: ModelConfig, cache: paged.PagedKVCache) -> paged.Attention:
    """The CPU kernel where it reads these pages, else XLA's reference attention."""
    fits = paged.kernel_fits(cfg, cache.k.dtype, cache.k.sharding)
    return cpu_kernels.paged_attention if fits else paged.attention_reference


class Runner:
    """Owns the parameters on device, the pool's pages, the per-row sampling and penalty state, and the
    compiled ragged step and decode loop."""

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
        cache_sharding: jax.sharding.Sharding | None = None,
        compile_lazily: bool = False,
        attention: paged.Attention | None = None,
    ):
        """`compile_lazily`: compile a decode program at its first use rather than only by
        `compile_decoding` (which serving runs beside the engine, so that no request waits for one).
        `attention`: by default the CPU kernel wherever it reads the pages (`attention_for`)."""
        self.cfg = cfg
        self.compile_lazily = compile_lazily
        self.params, self.layers = llama.serving_weights(params, cfg)
        self.max_num_seqs = max_num_seqs
        self.max_pages = -(-max_length // paged.PAGE_TOKENS)
        self.max_num_batched_tokens = max(max_num_batched_tokens, MIN_TOKEN_BUCKET)
        self.max_length = max_length
        self.max_decode_steps = max_decode_steps
        self.eos_ids = np.asarray(eos_ids, np.int32)
        self.cache_dtype = jnp.dtype(cache_dtype)  # the entries' (bf16 pages are stored as uint16)
        self.cache = paged.init_paged_cache(cfg, pages, cache_dtype, cache_sharding)
        self.attention = attention or attention_for(cfg, self.cache)
        self.attention_kernel = self.attention is cpu_kernels.paged_attention
        self._forward = jax.jit(
            functools.partial(_forward_step, cfg=cfg, attention=self.attention, rows_out=max_num_seqs),
            donate_argnums=2,
        )
        self._sample = jax.jit(_sample_step, donate_argnums=1)
        self._decode = jax.jit(
            functools.partial(
                _decode_steps,
                cfg=cfg,
                attention=self.attention,
                max_steps=max_decode_steps,
                max_length=max_length,
            ),
            donate_argnums=2,
        )
        # Decode programs by row count, as they finish compiling (`compile_decoding`); until a plan's
        # is ready, the engine steps it instead.
        self._decoders: dict[int, jax.stages.Compiled] = {}
        # Every row's repetition penalties; only rows of penalized requests are kept up to date. Placed
        # as the step's outputs will be, so that the first step compiles no variant of its own.
        vocab = cfg.vocab_size
        zeros = Penalties(jnp.zeros((max_num_seqs, vocab), jnp.int32), jnp.zeros((max_num_seqs, vocab), bool))
        replicated = _replicated(cache_sharding)
        self.penalties = zeros if replicated is None else jax.device_put(zeros, replicated)
        # Each row's sampling settings as host arrays, set when another request takes the row.
        self._sampling = sampling_rows(max_num_seqs, temperature=1.0, top_p=1.0, top_k=0, greedy=True, seed=0)
        self._row_owners: list[tuple[str, int] | None] = [None] * max_num_seqs

    @property
    def pages(self) -> int:
        return self.cache.pages

    @property
    def cache_bytes(self) -> int:
        return self.cache.nbytes

    def token_buckets(self) -> list[int]:
        """Every token count `step` pads to."""
        cap = self.max_num_batched_tokens
        return sorted({fine_bucket(n, MIN_TOKEN_BUCKET, cap) for n in range(1, cap + 1)})

    def row_buckets(self) -> list[int]:
        """Every row count `decode` pads to, the likeliest first."""
        sizes = {decode_rows(n, self.max_num_seqs) for n in range(1, self.max_num_seqs + 1)}
        return sorted(sizes, key=lambda rows: (rows & (rows - 1) != 0, rows))

    def can_decode(self, plan: StepPlan) -> bool:
        """Whether `decode` has its program for the plan's rows compiled (with `compile_lazily`, it is
        compiled now)."""
        rows = decode_rows(len(plan.pieces), self.max_num_seqs)
        if rows not in self._decoders and self.compile_lazily:
            self._compile_decoder(rows)
        return rows in self._decoders

    def shape(self, plan: StepPlan) -> tuple[int, int]:
        """The compiled (tokens, rows) shape a plan runs in; the rows follow from the tokens, since a step
        has at most one row per token."""
        tokens = fine_bucket(plan.tokens, MIN_TOKEN_BUCKET, self.max_num_batched_tokens)
        return tokens, min(tokens, self.max_num_seqs)

    def step(self, plan: StepPlan) -> dict[int, tuple[int, TokenLogprobs | None]]:
        """Compute the plan's pieces; the sampled next token (and its logprobs, when the request asked) of
        every piece that reaches its sequence's end, by the piece's index in the plan."""
        token_count, rows = self.shape(plan)
        tokens = np.zeros(token_count, np.int32)
        positions = np.zeros(token_count, np.int32)
        token_seqs = np.full(token_count, rows, np.int32)  # padding: a sequence past the table
        page_table = np.full((rows, self.max_pages), -1, np.int32)  # -1: no page (the kernel skips it)
        logit_index = np.zeros(rows, np.int32)
        at = 0
        for row, piece in enumerate(plan.pieces):
            count = piece.end - piece.start
            tokens[at : at + count] = piece.seq.tokens[piece.start : piece.end]
            positions[at : at + count] = np.arange(piece.start, piece.end)
            token_seqs[at : at + count] = row
            indices = piece.seq.table.indices
            page_table[row, : len(indices)] = indices
            logit_index[row] = at + count - 1
            at += count
        logits, self.cache = self._forward(
            self.params, self.layers, self.cache, tokens, positions, token_seqs, page_table, logit_index
        )
        outputs = self._sample_rows(plan, logits)
        return {
            i: (int(outputs.tokens[i]), _listed(outputs, i, piece.seq.request.logprobs))
            for i, piece in enumerate(plan.pieces)
            if piece.samples
        }

    def decode(self, plan: StepPlan, steps: int) -> dict[int, list[int]]:
        """Up to `steps` (at most `max_decode_steps`) decode steps of a plan of decode tokens only, whose
        sequences' pages have room for them (`Scheduler.reserve`) and whose program is compiled
        (`can_decode`); the tokens each piece generated, by its index in the plan. It stops early at the
        step where a sequence ends (EOS, its token budget, the context). Repetition penalties and
        logprobs are `step`'s only."""
        if any(p.seq.request.sampling.penalized or p.seq.request.logprobs is not None for p in plan.pieces):
            raise ValueError("decode runs no repetition penalties and no logprobs; step such plans")
        if not all(piece.end - piece.start == 1 and piece.samples for piece in plan.pieces):
            raise ValueError("decode takes plans of decode tokens only (one token per sequence, at its end)")
        if not self.can_decode(plan):
            raise ValueError(f"the decode program for {len(plan.pieces)} sequences is not compiled yet")
        steps = min(steps, self.max_decode_steps)
        rows = decode_rows(len(plan.pieces), self.max_num_seqs)
        state = _idle_rows(rows)._replace(sampling=self._rows_sampling(plan, rows))
        page_table = np.full((rows, self.max_pages), -1, np.int32)  # -1: no page (the kernel skips it)
        for row, piece in enumerate(plan.pieces):
            seq, request = piece.seq, piece.seq.request
            state.tokens[row], state.lengths[row] = seq.tokens[piece.start], piece.start
            state.remaining[row] = request.max_new_tokens - len(seq.generated)
            state.active[row], state.stop_at_eos[row] = True, not request.ignore_eos
            page_table[row, : len(seq.table.pages)] = seq.table.indices
        tokens, emitted, self.cache = self._decoders[rows](
            self.params, self.layers, self.cache, state, page_table, self.eos_ids, np.int32(steps)
        )
        tokens, emitted = np.asarray(tokens), np.asarray(emitted)
        return {i: tokens[i][emitted[i]].tolist() for i in range(len(plan.pieces))}

    def warm_up(self) -> None:
        """Compile every shape `step` runs and its sampler, with calls of padding only (they write nothing),
        so that no request waits for a compilation."""
        started = time.perf_counter()
        for count in self.token_buckets():
            rows = min(count, self.max_num_seqs)
            logits, self.cache = self._forward(
                self.params,
                self.layers,
                self.cache,
                np.zeros(count, np.int32),
                np.zeros(count, np.int32),
                np.full(count, rows, np.int32),
                np.full((rows, self.max_pages), -1, np.int32),
                np.zeros(rows, np.int32),
            )
        self._sample_rows(StepPlan(), logits)
        log.info(
            "compiled the ragged step for %d token counts (%d to %d) in %.1f s",
            len(self.token_buckets()),
            MIN_TOKEN_BUCKET,
            self.max_num_batched_tokens,
            time.perf_counter() - started,
        )

    @property
    def decoders_to_compile(self) -> int:
        return len(self.row_buckets()) - len(self._decoders)

    def compile_decoding(self) -> None:
        """Compile the multi-step decode program of every row count, the likeliest first; each is used as
        soon as it is ready. It may run on a thread of its own beside the engine: lowering reads only the
        arrays' shapes and placements, which the cache keeps once the engine has donated it."""
        started = time.perf_counter()
        for rows in self.row_buckets():
            if rows not in self._decoders:
                self._compile_decoder(rows)
        log.info(
            "compiled decoding for %d batch sizes (1 to %d) in %.1f s",
            len(self._decoders),
            self.max_num_seqs,
            time.perf_counter() - started,
        )

    def _compile_decoder(self, rows: int) -> None:
        page_table = np.full((rows, self.max_pages), -1, np.int32)
        lowered = self._decode.lower(
            self.params, self.layers, self.cache, _idle_rows(rows), page_table, self.eos_ids, np.int32(1)
        )
        self._decoders[rows] = lowered.compile()

    def _sample_rows(self, plan: StepPlan, logits: jax.Array) -> StepOutputs:
        """Sample the next token after each of the plan's pieces from its row of logits [max_num_seqs, V]."""
        rows = self.max_num_seqs
        seq_rows, samples, positions = (np.zeros(rows, dtype) for dtype in (np.int32, bool, np.int32))
        for row, piece in enumerate(plan.pieces):
            seq_rows[row], samples[row], positions[row] = piece.seq.row, piece.samples, piece.end
        requests = [piece.seq.request for piece in plan.pieces]
        sampling = self._rows_sampling(plan, rows)  # first: a new row's penalties start here
        outputs, self.penalties = self._sample(
            logits,
            self.penalties,
            sampling,
            seq_rows,
            samples,
            positions,
            np.bool_(any(request.sampling.penalized for request in requests)),
            np.bool_(any(request.logprobs is not None for request in requests)),
        )
        return jax.device_get(outputs)

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
    if top is None:
        return None
    chosen, top_ids, top_values = outputs.logprobs
    pairs = list(zip(top_ids[row, :top].tolist(), top_values[row, :top].tolist(), strict=True))
    return TokenLogprobs(int(outputs.tokens[row]), float(chosen[row]), pairs)


def _set_row(sampling: SamplingArrays, row: int, options: SamplingOptions) -> None:
    """Row `row` of the host arrays `sampling` set to a request's options."""
    one = sampling_rows(1, **vars(options))
    for column, value in zip(sampling, one, strict=True):
        column[row] = value[0]


def _idle_rows(rows: int) -> DecodeState:
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


def _replicated(sharding: jax.sharding.Sharding | None) -> jax.sharding.NamedSharding | None:
    """A sharding that copies an array whole onto every device of `sharding`'s mesh."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    return None

"""The device side over a paged KV cache: the pool's pages, one compiled ragged step that computes a
`StepPlan`'s pieces and samples each finished piece's next token, and multi-step decoding.

A step's flat batch is padded to a token bucket, and its rows (one per sequence) to a fixed function of
that bucket, so the compiled shapes are a dozen token counts whatever mix of prompts and decode tokens
arrives. Padding tokens belong to no sequence: they read and write nothing. A step of decode tokens only
may run several steps in one call (`decode`), each feeding the token the last one sampled, until a row
finishes: Python is entered once per chunk, which is where multi-step decoding pays. `warm_up` compiles
the smallest step, enough to serve; `compile_programs` compiles the rest beside serving, and each program
is used from the moment it is ready.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxserver.engine.constraints import bitmask_words
from jaxserver.engine.programs import (
    MIN_TOKEN_BUCKET,
    StepOutputs,
    decode_rows,
    decode_steps,
    fine_bucket,
    forward_step,
    idle_rows,
    sample_step,
    sampling_rows,
)
from jaxserver.engine.request import SamplingOptions, TokenLogprobs
from jaxserver.engine.scheduler import Sequence, StepPlan
from jaxserver.engine.step_relay import StepRelay, TokensByRow
from jaxserver.model import cpu_kernels, llama, paged
from jaxserver.model.config import ModelConfig
from jaxserver.model.llama import Params
from jaxserver.model.sampling import Penalties, SamplingArrays

log = logging.getLogger(__name__)


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
        """`compile_lazily`: compile each program at its first use rather than only by `warm_up` and
        `compile_programs` (which serving runs beside the engine, so that no request waits for one).
        `attention`: by default the CPU kernel wherever it reads the pages (`attention_for`)."""
        self.cfg = cfg
        self.compile_lazily = compile_lazily
        self.params, self.layers = llama.serving_weights(params, cfg, max_length)
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
        # On a mesh the step's hidden states and the sampler's outputs come out replicated, as every
        # sampler is compiled to take them.
        replicated = _replicated(cache_sharding)
        cache_shardings = jax.tree.map(lambda a: a.sharding, self.cache)
        placed = {} if replicated is None else {"out_shardings": (replicated, cache_shardings)}
        self._forward = jax.jit(
            functools.partial(forward_step, cfg=cfg, attention=self.attention, rows_out=max_num_seqs),
            donate_argnums=2,
            **placed,
        )
        self._sample = jax.jit(
            sample_step, donate_argnums=2, **({} if replicated is None else {"out_shardings": replicated})
        )
        self._relay = StepRelay()
        self._decode = jax.jit(
            functools.partial(
                decode_steps,
                cfg=cfg,
                attention=self.attention,
                max_steps=max_decode_steps,
                max_length=max_length,
                report_step=self._relay.report_step,
                report_done=self._relay.report_done,
            ),
            donate_argnums=2,
        )
        # Compiled programs as they become ready: the ragged step by token bucket, the sampler and
        # multi-step decoding by row count. Steps take at most the largest step here (`token_budget`) and
        # run in the smallest that holds them (`_ready_size`), and a decode-only plan whose program is
        # missing is stepped instead, so serving starts with the smallest step and `compile_programs`
        # brings the rest beside it. Lowered from the cache's shapes and placements
        # only, which hold while the engine thread donates the arrays themselves.
        self._steps: dict[int, jax.stages.Compiled] = {}
        self._samplers: dict[int, jax.stages.Compiled] = {}
        self._decoders: dict[int, jax.stages.Compiled] = {}
        self._cache_spec = _spec(self.cache)
        # Every row's repetition penalties and logit bias; only rows of penalized requests are kept up to
        # date. Placed
        # as the step's outputs will be, so that the first step compiles no variant of its own.
        vocab = cfg.vocab_size
        zeros = Penalties(*(jnp.zeros((max_num_seqs, vocab), t) for t in (jnp.int32, bool, jnp.float32)))
        self.penalties = zeros if replicated is None else jax.device_put(zeros, replicated)
        # Each row's sampling settings as host arrays, set when another request takes the row.
        self._sampling = sampling_rows(max_num_seqs, temperature=1.0, top_p=1.0, top_k=0, greedy=True, seed=0)
        self._row_owners: list[tuple[str, int] | None] = [None] * max_num_seqs
        # Rows whose bias is not zero: the sampler adds a row's bias whatever its request, so a request
        # without one that takes such a row clears it.
        self._biased_rows: set[int] = set()
        self._no_masks: dict[int, np.ndarray] = {}

    def model_params(self) -> Params:
        """The parameters in the stacked layout they were given in, rebuilt from the serving weights."""
        return llama.stacked_params(self.params, self.layers, self.cfg)

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

    @property
    def token_budget(self) -> int:
        """The most tokens a step may take now: the largest step compiled so far, or (compiling lazily, or
        before any) `max_num_batched_tokens`."""
        compiled = list(self._steps)
        return self.max_num_batched_tokens if self.compile_lazily or not compiled else max(compiled)

    def shape(self, plan: StepPlan) -> tuple[int, int]:
        """The (tokens, rows) shape a plan runs in: the smallest compiled step that holds its tokens (else
        the bucket that will be compiled for them). The rows follow from the tokens, since a step has at
        most one row per token."""
        tokens = self._ready_size(
            self._steps, fine_bucket(plan.tokens, MIN_TOKEN_BUCKET, self.max_num_batched_tokens)
        )
        return tokens, min(tokens, self.max_num_seqs)

    def step(
        self, plan: StepPlan, allowed: np.ndarray | None = None
    ) -> dict[int, tuple[int, TokenLogprobs | None]]:
        """Compute the plan's pieces; the sampled next token (and its logprobs, when the request asked) of
        every piece that reaches its sequence's end, by the piece's index in the plan. `allowed`: a token
        bitmask per piece (int32 [pieces, >= ceil(vocab / 32)], all bits set for an unconstrained one)."""
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
        hidden, self.cache = self._step_program(token_count)(
            self.params, self.layers, self.cache, tokens, positions, token_seqs, page_table, logit_index
        )
        outputs = self._sample_rows(plan, hidden, allowed)
        return {
            i: (int(outputs.tokens[i]), _listed(outputs, i, piece.seq.request.logprobs))
            for i, piece in enumerate(plan.pieces)
            if piece.samples
        }

    def decode(
        self, plan: StepPlan, steps: int, on_tokens: Callable[[TokensByRow], None] | None = None
    ) -> dict[int, list[int]]:
        """Up to `steps` (at most `max_decode_steps`) decode steps of a plan of decode tokens only, whose
        sequences' pages have room for them (`Scheduler.reserve`) and whose program is compiled
        (`can_decode`); the tokens each piece generated, by its index in the plan. It stops early at the
        step where a sequence ends (EOS, its token budget, the context). Requests that are `stepped`
        are `step`'s only. While the call runs, `on_tokens` gets each piece's new tokens every few steps
        (`StepRelay.run`)."""
        if any(piece.seq.request.stepped for piece in plan.pieces):
            raise ValueError("decode runs no penalties, logit bias, grammar or logprobs; step such plans")
        if not all(piece.end - piece.start == 1 and piece.samples for piece in plan.pieces):
            raise ValueError("decode takes plans of decode tokens only (one token per sequence, at its end)")
        if not self.can_decode(plan):
            raise ValueError(f"the decode program for {len(plan.pieces)} sequences is not compiled yet")
        steps = min(steps, self.max_decode_steps)
        rows = decode_rows(len(plan.pieces), self.max_num_seqs)
        state = idle_rows(rows)._replace(sampling=self._rows_sampling(plan, rows))
        page_table = np.full((rows, self.max_pages), -1, np.int32)  # -1: no page (the kernel skips it)
        for row, piece in enumerate(plan.pieces):
            seq, request = piece.seq, piece.seq.request
            state.tokens[row], state.lengths[row] = seq.tokens[piece.start], piece.start
            state.remaining[row] = request.max_new_tokens - len(seq.generated)
            state.active[row], state.stop_at_eos[row] = True, not request.ignore_eos
            page_table[row, : len(seq.table.pages)] = seq.table.indices
        program, cache = self._decoders[rows], self.cache  # the call runs on the relay's thread
        tokens, emitted, self.cache = self._relay.run(
            lambda: program(
                self.params, self.layers, cache, state, page_table, self.eos_ids, np.int32(steps)
            ),
            len(plan.pieces),
            on_tokens,
        )
        tokens, emitted = np.asarray(tokens), np.asarray(emitted)
        return {i: tokens[i][emitted[i]].tolist() for i in range(len(plan.pieces))}

    def warm_up(self) -> None:
        """Compile the smallest step and the samplers for one row and for every row, running them once on
        padding (which writes nothing): enough to serve, in steps of a few tokens, with no request waiting
        for a compilation."""
        started = time.perf_counter()
        count = self.token_buckets()[0]
        rows = min(count, self.max_num_seqs)
        hidden, self.cache = self._step_program(count)(
            self.params,
            self.layers,
            self.cache,
            np.zeros(count, np.int32),
            np.zeros(count, np.int32),
            np.full(count, rows, np.int32),
            np.full((rows, self.max_pages), -1, np.int32),
            np.zeros(rows, np.int32),
        )
        for sample_rows in (1, self.max_num_seqs):
            self._sampler(sample_rows)
        self._sample_rows(StepPlan(), hidden, None)
        log.info(
            "compiled the %d-token step and two samplers in %.1f s", count, time.perf_counter() - started
        )

    @property
    def programs_to_compile(self) -> int:
        missing_steps = len(self.token_buckets()) - len(self._steps)
        missing_samplers = len(self.row_buckets()) - len(self._samplers)
        return missing_steps + missing_samplers + len(self.row_buckets()) - len(self._decoders)

    def compile_programs(self) -> None:
        """Compile every program `warm_up` left out, each used as soon as it is ready: the largest step
        (the budget prompts fill), the samplers, the decode programs (likeliest row counts first), then
        the steps between. It may run on a thread of its own beside the engine."""
        started = time.perf_counter()
        steps = sorted(self.token_buckets(), reverse=True)
        for size in steps[:1]:
            self._step_program(size)
        for rows in self.row_buckets():
            self._sampler(rows)
        for rows in self.row_buckets():
            if rows not in self._decoders:
                self._compile_decoder(rows)
        for size in steps[1:]:
            self._step_program(size)
        log.info(
            "compiled the steps for %d token counts (%d to %d) and decoding for %d batch sizes in %.1f s",
            len(self._steps),
            MIN_TOKEN_BUCKET,
            self.max_num_batched_tokens,
            len(self._decoders),
            time.perf_counter() - started,
        )

    def _ready_size(self, programs: dict[int, jax.stages.Compiled], wanted: int) -> int:
        """The smallest compiled size of `programs` that holds a bucket of size `wanted`, or `wanted` itself
        (compiled at its first use) when compiling lazily or when none is ready."""
        fitting = [size for size in list(programs) if size >= wanted]  # another thread adds to it
        return wanted if self.compile_lazily or not fitting else min(fitting)

    def _step_program(self, size: int) -> jax.stages.Compiled:
        """The step compiled for `size` tokens, compiled now if it is not yet."""
        if size not in self._steps:
            self._compile_step(size)
        return self._steps[size]

    def _compile_step(self, count: int) -> None:
        rows = min(count, self.max_num_seqs)
        tokens = np.zeros(count, np.int32)
        page_table = np.full((rows, self.max_pages), -1, np.int32)
        lowered = self._forward.lower(
            self.params,
            self.layers,
            self._cache_spec,
            tokens,
            tokens,
            tokens,
            page_table,
            np.zeros(rows, np.int32),
        )
        self._steps[count] = lowered.compile()

    def _compile_decoder(self, rows: int) -> None:
        page_table = np.full((rows, self.max_pages), -1, np.int32)
        lowered = self._decode.lower(
            self.params, self.layers, self._cache_spec, idle_rows(rows), page_table, self.eos_ids, np.int32(1)
        )
        self._decoders[rows] = lowered.compile()

    def _sampler(self, rows: int) -> jax.stages.Compiled:
        """The sampler compiled for `rows` rows, compiled now if it is not yet."""
        if rows not in self._samplers:
            hidden = self._step_program(self.token_buckets()[0]).out_info[0]  # as every step returns it
            host = [np.zeros(rows, dtype) for dtype in (np.int32, bool, np.int32)]
            lowered = self._sample.lower(
                self.params,
                hidden,
                _spec(self.penalties),
                sampling_rows(rows, temperature=1.0, top_p=1.0, top_k=0, greedy=True, seed=0),
                *host,
                self._all_allowed(rows),
                np.bool_(False),
                np.bool_(False),
                np.bool_(False),
            )
            self._samplers[rows] = lowered.compile()
        return self._samplers[rows]

    def _all_allowed(self, rows: int) -> np.ndarray:
        """A bitmask that allows every token in `rows` rows, kept per row count (read-only: a step copies
        it before writing a grammar's rows)."""
        if rows not in self._no_masks:
            self._no_masks[rows] = np.full((rows, bitmask_words(self.cfg.vocab_size)), -1, np.int32)
        return self._no_masks[rows]

    def _sample_rows(self, plan: StepPlan, hidden: jax.Array, allowed: np.ndarray | None) -> StepOutputs:
        """Sample the next token after each of the plan's pieces from its row of the step's final hidden
        states [max_num_seqs, hidden], in the smallest compiled sampler that holds the plan's rows, among
        the tokens `allowed` (a bitmask per piece) keeps."""
        rows = self._ready_size(self._samplers, decode_rows(max(len(plan.pieces), 1), self.max_num_seqs))
        seq_rows, samples, positions = (np.zeros(rows, dtype) for dtype in (np.int32, bool, np.int32))
        for row, piece in enumerate(plan.pieces):
            seq_rows[row], samples[row], positions[row] = piece.seq.row, piece.samples, piece.end
        requests = [piece.seq.request for piece in plan.pieces]
        sampling = self._rows_sampling(plan, rows)  # first: a new row's penalties start here
        mask = self._all_allowed(rows)
        if allowed is not None:
            mask = mask.copy()
            mask[: len(plan.pieces)] = allowed[:, : mask.shape[1]]
        outputs, self.penalties = self._sampler(rows)(
            self.params,
            hidden,
            self.penalties,
            sampling,
            seq_rows,
            samples,
            positions,
            mask,
            np.bool_(any(request.sampling.penalized for request in requests)),
            np.bool_(allowed is not None),
            np.bool_(any(request.logprobs is not None for request in requests)),
        )
        return jax.device_get(outputs)

    def _start_penalties(self, row: int, seq: Sequence) -> None:
        """Row `row`'s penalties from the tokens a sequence holds (a resumed one has generated some), and
        its request's logit bias."""
        vocab = self.cfg.vocab_size
        counts = np.bincount(np.asarray(seq.generated, np.int64), minlength=vocab).astype(np.int32)
        in_prompt = np.zeros(vocab, bool)
        in_prompt[seq.request.prompt_ids] = True
        bias = np.zeros(vocab, np.float32)
        for token, value in seq.request.sampling.logit_bias:
            bias[token] = value
        self.penalties = Penalties(
            *(
                part.at[row].set(new)
                for part, new in zip(self.penalties, (counts, in_prompt, bias), strict=True)
            )
        )
        if seq.request.sampling.logit_bias:
            self._biased_rows.add(row)
        else:
            self._biased_rows.discard(row)

    def _rows_sampling(self, plan: StepPlan, rows: int) -> SamplingArrays:
        """The plan's sequences' sampling settings, one row per piece (padding rows as row 0's)."""
        for piece in plan.pieces:
            seq = piece.seq
            # A resumed sequence counts as new: its row may be another, or hold counts of its earlier stay.
            owner = (seq.request.request_id, seq.preemptions)
            if self._row_owners[seq.row] != owner:
                _set_row(self._sampling, seq.row, seq.request.sampling)
                if seq.request.sampling.penalized or seq.row in self._biased_rows:
                    self._start_penalties(seq.row, seq)
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
    # The logit bias is no column here: it lives in the runner's penalty rows.
    one = sampling_rows(1, **{name: v for name, v in vars(options).items() if name != "logit_bias"})
    for column, value in zip(sampling, one, strict=True):
        column[row] = value[0]


def _spec(tree: Any) -> Any:
    """The shapes, dtypes and placements of a pytree of arrays, to lower programs from."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)


def _replicated(sharding: jax.sharding.Sharding | None) -> jax.sharding.NamedSharding | None:
    """A sharding that copies an array whole onto every device of `sharding`'s mesh."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    return None

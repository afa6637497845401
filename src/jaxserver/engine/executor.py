"""The device side of the runner: the parameters, the paged KV cache, the penalty rows and the compiled
programs, driven only by host arrays.

Every call that runs a program (`step`, `decode`, `set_penalties`) takes plain arrays and numbers, and is
first handed to `announce` when one is set: on several processes (`parallel.group`), process 0's executor
announces each call to the others, whose executors replay it, so that every process runs the same program
on the same inputs over the global mesh. Which program size a call runs is fixed by its arrays' shapes, so
a replaying process compiles a program it lacks at its first use.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxserver.engine.constraints import bitmask_words
from jaxserver.engine.programs import (
    MIN_TOKEN_BUCKET,
    DecodeState,
    StepOutputs,
    decode_rows,
    decode_steps,
    fine_bucket,
    forward_step,
    idle_rows,
    sample_step,
    sampling_rows,
)
from jaxserver.engine.step_relay import StepRelay, TokensByRow
from jaxserver.model import cpu_kernels, paged, serving_layout
from jaxserver.model.config import ModelConfig
from jaxserver.model.llama import Params
from jaxserver.model.sampling import Penalties, SamplingArrays

log = logging.getLogger(__name__)

# (name of the call, its arguments), as `announce` gets them and a replaying executor takes them.
Call = tuple[str, tuple[Any, ...]]
REPLAYED_CALLS = ("step", "decode", "set_penalties", "keep_alive")
# An idle executor announces a call that runs nothing this often, so that no other process waits for the
# next call longer than this in one collective.
KEEP_ALIVE_S = 30.0


class StepBatch(NamedTuple):
    """A ragged step's flat batch: token ids, their positions and rows (padding: the row count), each
    row's pages, and where each row's last token is."""

    tokens: np.ndarray
    positions: np.ndarray
    token_seqs: np.ndarray
    page_table: np.ndarray
    logit_index: np.ndarray


class SampleBatch(NamedTuple):
    """What the sampler takes beside the step's hidden states (`programs.sample_step`)."""

    sampling: SamplingArrays
    seq_rows: np.ndarray
    samples: np.ndarray
    positions: np.ndarray
    allowed: np.ndarray | None  # None: every token (sent as nothing to other processes)
    penalize: bool
    constrain: bool
    want_logprobs: bool


def attention_for(cfg: ModelConfig, cache: paged.PagedKVCache) -> paged.Attention:
    """The CPU kernel where it reads these pages, else XLA's reference attention."""
    fits = paged.kernel_fits(cfg, cache.k.dtype, cache.k.sharding)
    return cpu_kernels.paged_attention if fits else paged.attention_reference


class Executor:
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
        max_decode_steps: int,
        eos_ids: tuple[int, ...],
        cache_sharding: jax.sharding.Sharding | None,
        compile_lazily: bool,
        attention: paged.Attention | None,
    ):
        self.cfg = cfg
        self.compile_lazily = compile_lazily
        self.announce: Callable[[Call], None] | None = None
        self._announced_at = time.monotonic()
        self.params, self.layers = serving_layout.serving_weights(params, cfg, max_length)
        self.max_num_seqs = max_num_seqs
        self.max_pages = -(-max_length // paged.PAGE_TOKENS)
        self.max_num_batched_tokens = max(max_num_batched_tokens, MIN_TOKEN_BUCKET)
        self.max_decode_steps = max_decode_steps
        self.eos_ids = np.asarray(eos_ids, np.int32)
        self.cache = paged.init_paged_cache(cfg, pages, cache_dtype, cache_sharding)
        self.attention = attention or attention_for(cfg, self.cache)
        # On a mesh every program's small outputs come out replicated: the samplers are compiled to take
        # the step's hidden states so, and every process can read the tokens.
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
        # The decode loop's host callbacks run on process 0 only (its first device's), so only there does
        # a call go through the relay.
        self._reports_here = jax.process_index() == 0
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
            **({} if replicated is None else {"out_shardings": (replicated, replicated, cache_shardings)}),
        )
        # Compiled programs as they become ready: the ragged step by token bucket, the sampler and
        # multi-step decoding by row count. Lowered from the cache's shapes and placements only, which
        # hold while the engine thread donates the arrays themselves.
        self._steps: dict[int, jax.stages.Compiled] = {}
        self._samplers: dict[int, jax.stages.Compiled] = {}
        self._decoders: dict[int, jax.stages.Compiled] = {}
        self._cache_spec = _spec(self.cache)
        self._no_masks: dict[int, np.ndarray] = {}
        # Every row's repetition penalties and logit bias, placed as the step's outputs will be, so that
        # the first step compiles no variant of its own.
        vocab = cfg.vocab_size
        self.penalties = Penalties(
            *(jnp.zeros((max_num_seqs, vocab), t, device=replicated) for t in (jnp.int32, bool, jnp.float32))
        )

    # --- sizes ------------------------------------------------------------------------------------------

    def token_buckets(self) -> list[int]:
        """Every token count a step pads to."""
        cap = self.max_num_batched_tokens
        return sorted({fine_bucket(n, MIN_TOKEN_BUCKET, cap) for n in range(1, cap + 1)})

    def row_buckets(self) -> list[int]:
        """Every row count decoding and sampling pad to, the likeliest first."""
        sizes = {decode_rows(n, self.max_num_seqs) for n in range(1, self.max_num_seqs + 1)}
        return sorted(sizes, key=lambda rows: (rows & (rows - 1) != 0, rows))

    @property
    def token_budget(self) -> int:
        """The most tokens a step may take now: the largest step compiled so far, or (compiling lazily, or
        before any) `max_num_batched_tokens`."""
        compiled = list(self._steps)
        return self.max_num_batched_tokens if self.compile_lazily or not compiled else max(compiled)

    def step_tokens(self, tokens: int) -> int:
        """The token count a step of `tokens` runs in: the smallest compiled step that holds them (else the
        bucket that will be compiled for them)."""
        wanted = fine_bucket(tokens, MIN_TOKEN_BUCKET, self.max_num_batched_tokens)
        return self._ready_size(self._steps, wanted)

    def sampler_rows(self, pieces: int) -> int:
        """The rows a sampler for `pieces` pieces runs in."""
        return self._ready_size(self._samplers, decode_rows(max(pieces, 1), self.max_num_seqs))

    def can_decode(self, rows: int) -> bool:
        """Whether the decode program for `rows` rows is compiled (with `compile_lazily`, it is now)."""
        if rows not in self._decoders and self.compile_lazily:
            self._compile_decoder(rows)
        return rows in self._decoders

    @property
    def programs_to_compile(self) -> int:
        missing_steps = len(self.token_buckets()) - len(self._steps)
        missing_samplers = len(self.row_buckets()) - len(self._samplers)
        return missing_steps + missing_samplers + len(self.row_buckets()) - len(self._decoders)

    # --- the calls every process runs -------------------------------------------------------------------

    def step(self, batch: StepBatch, sample: SampleBatch) -> StepOutputs:
        """One ragged step over the cache, then the sampler over its rows; the outputs as host arrays."""
        self._announce("step", batch, sample)
        hidden, self.cache = self._step_program(len(batch.tokens))(
            self.params, self.layers, self.cache, *batch
        )
        outputs, self.penalties = self._sampler(len(sample.seq_rows))(
            self.params,
            hidden,
            self.penalties,
            sample.sampling,
            sample.seq_rows,
            sample.samples,
            sample.positions,
            self.all_allowed(len(sample.seq_rows)) if sample.allowed is None else sample.allowed,
            np.bool_(sample.penalize),
            np.bool_(sample.constrain),
            np.bool_(sample.want_logprobs),
        )
        return jax.device_get(outputs)

    def decode(
        self,
        state: DecodeState,
        page_table: np.ndarray,
        steps: int,
        reported_rows: int,
        on_tokens: Callable[[TokensByRow], None] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Up to `steps` decode steps of `state`'s rows (`programs.decode_steps`): the tokens [rows,
        max_decode_steps] and where each was generated. While it runs, `on_tokens` gets the new tokens of
        the first `reported_rows` rows every few steps (`StepRelay.run`)."""
        self._announce("decode", state, page_table, steps, reported_rows)
        program, cache = self._decoders_program(len(page_table)), self.cache

        def call() -> tuple[jax.Array, jax.Array, paged.PagedKVCache]:
            # Until it has run: the relay takes a returned call as done, and dispatch may return earlier
            # (seen on a mesh of 8 CPU devices, where the relay then left every hand-on waiting 10 s).
            return jax.block_until_ready(
                program(self.params, self.layers, cache, state, page_table, self.eos_ids, np.int32(steps))
            )

        # The call runs on the relay's thread, which is why the cache is bound before it.
        result = self._relay.run(call, reported_rows, on_tokens) if self._reports_here else call()
        tokens, emitted, self.cache = result
        return np.asarray(tokens), np.asarray(emitted)

    def set_penalties(self, row: int, counts: np.ndarray, in_prompt: np.ndarray, bias: np.ndarray) -> None:
        """Row `row`'s penalty state: token counts so far, prompt tokens, logit bias."""
        self._announce("set_penalties", row, counts, in_prompt, bias)
        self.penalties = Penalties(
            *(
                part.at[row].set(new)
                for part, new in zip(self.penalties, (counts, in_prompt, bias), strict=True)
            )
        )

    def keep_alive(self) -> None:
        """Runs nothing; announced when the executor has been idle for KEEP_ALIVE_S."""
        self._announce("keep_alive")

    def idle(self) -> None:
        """Called while there is no work: keeps the other processes' wait for a call short."""
        if self.announce is not None and time.monotonic() - self._announced_at > KEEP_ALIVE_S:
            self.keep_alive()

    def _announce(self, name: str, *args: Any) -> None:
        if self.announce is not None:
            self.announce((name, args))
            self._announced_at = time.monotonic()

    # --- compilation ------------------------------------------------------------------------------------

    def warm_up(self) -> None:
        """Compile the smallest step and the samplers for one row and for every row, running them once on
        padding (which writes nothing): enough to serve, in steps of a few tokens, with no request waiting
        for a compilation."""
        started = time.perf_counter()
        count = self.token_buckets()[0]
        rows = min(count, self.max_num_seqs)
        for sample_rows in (1, self.max_num_seqs):
            self._sampler(sample_rows)
        batch = StepBatch(
            np.zeros(count, np.int32),
            np.zeros(count, np.int32),
            np.full(count, rows, np.int32),
            np.full((rows, self.max_pages), -1, np.int32),
            np.zeros(rows, np.int32),
        )
        self.step(batch, self.idle_sample(self.sampler_rows(0)))
        log.info(
            "compiled the %d-token step and two samplers in %.1f s", count, time.perf_counter() - started
        )

    def idle_sample(self, rows: int) -> SampleBatch:
        """Sampler inputs of `rows` padding rows, which sample nothing."""
        host = [np.zeros(rows, dtype) for dtype in (np.int32, bool, np.int32)]
        sampling = sampling_rows(rows, temperature=1.0, top_p=1.0, top_k=0, greedy=True, seed=0)
        return SampleBatch(sampling, *host, None, False, False, False)

    def all_allowed(self, rows: int) -> np.ndarray:
        """A bitmask that allows every token in `rows` rows, kept per row count (read-only: copy it before
        writing a grammar's rows)."""
        if rows not in self._no_masks:
            self._no_masks[rows] = np.full((rows, bitmask_words(self.cfg.vocab_size)), -1, np.int32)
        return self._no_masks[rows]

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
            rows = min(size, self.max_num_seqs)
            tokens = np.zeros(size, np.int32)
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
            self._steps[size] = lowered.compile()
        return self._steps[size]

    def _decoders_program(self, rows: int) -> jax.stages.Compiled:
        if rows not in self._decoders:  # a replaying process may not have compiled it yet
            self._compile_decoder(rows)
        return self._decoders[rows]

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
            sample = self.idle_sample(rows)
            lowered = self._sample.lower(
                self.params,
                hidden,
                _spec(self.penalties),
                sample.sampling,
                sample.seq_rows,
                sample.samples,
                sample.positions,
                self.all_allowed(rows),
                np.bool_(False),
                np.bool_(False),
                np.bool_(False),
            )
            self._samplers[rows] = lowered.compile()
        return self._samplers[rows]


def _spec(tree: Any) -> Any:
    """The shapes, dtypes and placements of a pytree of arrays, to lower programs from."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)


def _replicated(sharding: jax.sharding.Sharding | None) -> jax.sharding.NamedSharding | None:
    """A sharding that copies an array whole onto every device of `sharding`'s mesh."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    return None

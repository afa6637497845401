"""The device side: a slot-structured KV cache and the jitted prefill and decode-chunk steps over it.

A runner owns `slots` cache rows of `cache_len` tokens each. `prefill` writes one prompt into a slot and
samples its first token; `decode_chunk` advances every active slot by up to `steps` tokens inside one
compiled loop, so Python is entered once per chunk. Stop conditions that need no text (EOS, the token
budget, the end of the cache) are evaluated on device; stop strings are the caller's job.

Shapes are bucketed so the number of compilations stays small: prompts are padded by `prompt_bucket`.
Prompts and decoding attend through the CPU kernel (`model/cpu_kernels.py`) wherever it can; the kernel
reads each query's own cache range, so prompt shapes differ only in their padded length and decode shapes
only in their number of rows (`row_bucket`), and all are compiled before the server is ready. Otherwise (a
cache split over devices) they attend with XLA's ops over the first `attn_len` cache entries: for decoding,
the smallest power of two (at least `MIN_ATTN_BUCKET`) that covers what the active rows can reach by the
end of the chunk; those buckets stay coarse because every decode shape is compiled in advance (the common
ones before the server is ready, the rest beside it), at some seconds each.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxserver.engine.request import MAX_TOP_LOGPROBS
from jaxserver.model import cpu_kernels, llama
from jaxserver.model.config import ModelConfig
from jaxserver.model.llama import KVCache, Params
from jaxserver.model.sampling import (
    LogprobArrays,
    Penalties,
    SamplingArrays,
    apply_penalties,
    count_tokens,
    sample,
    token_logprobs,
)

log = logging.getLogger(__name__)

MIN_PROMPT_BUCKET = 16
PROMPT_STEP = 16
MIN_ATTN_BUCKET = 64


def bucket(n: int, minimum: int, cap: int) -> int:
    """Smallest power of two >= n (and >= minimum), but never above cap."""
    size = minimum
    while size < n:
        size *= 2
    return min(size, cap)


def fine_bucket(n: int, minimum: int, cap: int) -> int:
    """Smallest power of two or 1.5 times one (16, 24, 32, 48, 64, 96, ...) >= n and >= minimum, never
    above cap: padding wastes at most a third of the work, for twice the shapes of `bucket`."""
    size = bucket(n, minimum, cap)
    three_quarters = size * 3 // 4
    return three_quarters if n <= three_quarters and three_quarters >= minimum else size


def quarter_bucket(n: int, cap: int) -> int:
    """n rounded up to four steps per doubling (..., 10, 12, 14, 16, 20, 24, 28, 32, 40, ...), never above
    cap: padding wastes at most a fifth of the work above 8."""
    step = max(bucket(n, 1, cap) // 8, 1)
    return min(-(-n // step) * step, cap)


def row_bucket(n: int, cap: int) -> int:
    """Rows computed for n active slots with the decode kernel, whose shapes vary only in rows: powers of
    two up to 8, then `quarter_bucket`. Padding rows cost as much as real ones, and powers of two padded
    too many of them at 32 streams (docs/performance.md)."""
    return bucket(n, 1, cap) if n <= 8 else quarter_bucket(n, cap)


def prompt_bucket(n: int, cap: int) -> int:
    """Padded length of an n-token prompt piece: `fine_bucket` up to 32 tokens, multiples of 16 up to
    256, `quarter_bucket` above (320, 384, 448, ...), never above cap. Prefill costs most per token and
    its shapes compile quickly: with `quarter_bucket` from 128 on, the rest of a prompt whose start was in
    the cache was padded back to the prompt's full bucket, and reuse saved nothing (docs/performance.md)."""
    if n <= 2 * PROMPT_STEP:
        return fine_bucket(n, MIN_PROMPT_BUCKET, cap)
    if n <= 16 * PROMPT_STEP:
        return min(-(-n // PROMPT_STEP) * PROMPT_STEP, cap)
    return quarter_bucket(n, cap)


def copy_bucket(n: int, cap: int) -> int:
    """Positions `Runner.copy_prefix` copies for n tokens: whole key blocks, by powers of two."""
    return bucket(n, llama.KEY_BLOCK, cap)


def prompt_buckets(cap: int) -> list[int]:
    """Every padded length `prompt_bucket` gives for pieces of up to cap tokens."""
    return sorted({prompt_bucket(n, cap) for n in range(1, cap + 1)})


class DecodeState(NamedTuple):
    """Per-slot decoding state; every field is [slots]."""

    tokens: jax.Array  # int32: the last token, fed to the next step
    lengths: jax.Array  # int32: cache index where the next K/V are written
    starts: jax.Array  # int32: first valid cache index (> 0 only for left-padded prompts)
    remaining: jax.Array  # int32: tokens the slot may still generate
    active: jax.Array  # bool
    stop_at_eos: jax.Array  # bool: False for requests that ignore EOS (benchmarks)
    sampling: SamplingArrays


def _prefill(
    params: Params,
    layers: list[Params],
    cache: KVCache,
    penalties: Penalties | None,
    tokens: jax.Array,
    slot: jax.Array,
    write_pos: jax.Array,
    start: jax.Array,
    logit_index: jax.Array,
    sampling: SamplingArrays,
    in_prompt: jax.Array | None,
    rope: tuple[jax.Array, jax.Array],
    *,
    cfg: ModelConfig,
    attn_len: int,
    want_logprobs: bool,
    attention_kernel: bool,
) -> tuple[jax.Array, LogprobArrays | None, Penalties | None, KVCache]:
    """A piece of one prompt, tokens [1, P], into cache row `slot` [1] from index `write_pos`, attending
    to everything before it. Returns the token sampled after position `logit_index` of the piece [1] (and
    its logprobs when wanted). With `penalties` (all rows), the slot's row starts afresh from `in_prompt`
    [V] (which tokens the whole prompt holds), penalizes the sampled token and counts it. `rope` is
    `llama.rotary` of the piece's positions."""
    logits, cache = llama.forward(
        params,
        layers,
        cfg,
        tokens,
        cache,
        write_pos=write_pos,
        start=start,
        attn_len=attn_len,
        slot_ids=slot,
        logit_index=logit_index,
        attention_kernel=attention_kernel,
        rope=rope,
    )
    tokens_before_next = write_pos + logit_index + 1 - start
    raw_logits = logits
    if penalties is not None:
        row = Penalties(jnp.zeros_like(penalties.counts[slot]), in_prompt[None, :])
        logits = apply_penalties(logits, sampling, row)
    token = sample(logits, sampling, positions=tokens_before_next)
    if penalties is not None:
        row = count_tokens(row, token, jnp.ones_like(token, bool))
        penalties = Penalties(
            penalties.counts.at[slot].set(row.counts), penalties.in_prompt.at[slot].set(row.in_prompt)
        )
    logprobs = token_logprobs(raw_logits, token, MAX_TOP_LOGPROBS) if want_logprobs else None
    return token, logprobs, penalties, cache


def _copy_prefix(cache: KVCache, source: jax.Array, dest: jax.Array, *, positions: int) -> KVCache:
    """`cache` with cache row `dest`'s first `positions` (static) entries replaced by row `source`'s."""

    def copied(layer: jax.Array, count: int) -> jax.Array:
        # A slot's first `count` entries along axis 2: key blocks for keys, positions for values.
        corner = (0,) * (layer.ndim - 1)
        piece = jax.lax.dynamic_slice(layer, (source, *corner), (1, layer.shape[1], count, *layer.shape[3:]))
        return jax.lax.dynamic_update_slice(layer, piece, (dest, *corner))

    return KVCache(
        tuple(copied(layer, llama.key_blocks(positions)) for layer in cache.k),
        tuple(copied(layer, positions) for layer in cache.v),
    )


class ChunkOutputs(NamedTuple):
    """What a decode chunk produced, per row and step: [B, max_steps] (logprobs: [B, max_steps, ...])."""

    tokens: jax.Array  # int32
    emitted: jax.Array  # bool: False where the row had finished or the chunk ended
    logprobs: LogprobArrays | None  # when asked for


def _advanced(state: DecodeState, new_tokens: jax.Array, eos_ids: jax.Array, cache_len: int) -> DecodeState:
    """`state` after its active rows took `new_tokens` [B]: longer by one, and inactive where EOS, the
    token budget or the end of the cache finished them."""
    live = state.active
    lengths = state.lengths + live
    remaining = state.remaining - live
    finished = (jnp.isin(new_tokens, eos_ids) & state.stop_at_eos) | (remaining <= 0) | (lengths >= cache_len)
    return state._replace(
        tokens=jnp.where(live, new_tokens, state.tokens),
        lengths=lengths,
        remaining=remaining,
        active=live & ~finished,
    )


def _no_outputs(rows: int, max_steps: int, want_logprobs: bool) -> ChunkOutputs:
    """A decode chunk's outputs before its first step."""
    logprobs = None
    if want_logprobs:
        top = (rows, max_steps, MAX_TOP_LOGPROBS)
        logprobs = LogprobArrays(
            jnp.zeros((rows, max_steps)), jnp.zeros(top, jnp.int32), jnp.zeros(top, jnp.float32)
        )
    return ChunkOutputs(jnp.zeros((rows, max_steps), jnp.int32), jnp.zeros((rows, max_steps), bool), logprobs)


def _decode_chunk(
    params: Params,
    layers: list[Params],
    cache: KVCache,
    penalties: Penalties | None,
    state: DecodeState,
    eos_ids: jax.Array,
    steps: jax.Array,
    slot_ids: jax.Array,
    *,
    cfg: ModelConfig,
    max_steps: int,
    attn_len: int,
    want_logprobs: bool,
    attention_kernel: bool,
) -> tuple[ChunkOutputs, DecodeState, Penalties | None, KVCache]:
    """Up to `steps` (<= max_steps, a runtime value) tokens for the cache rows `slot_ids` [B] (distinct;
    `state` holds their B rows), fewer if a row finishes before (see `keep_going`). Returns the chunk's
    outputs, the new state, penalties and cache. Attention reads the rows' first `attn_len` cache entries
    in place. `penalties` (all rows) is given only when some row uses repetition penalties: it costs a
    [B, vocab] pass per step."""
    cache_len = cache.length
    rows = state.tokens.shape[0]
    first = jnp.zeros((rows,), jnp.int32)
    # A row active at step i is at its first position + i (rows only ever leave a chunk).
    positions = (state.lengths - state.starts)[:, None] + jnp.arange(max_steps)[None, :]
    chunk_cos, chunk_sin = llama.rotary(positions, cfg)  # [B, max_steps, 1, hd/2]

    def step(carry):
        i, state, cache, rows_penalties, outputs = carry
        # Inactive slots write out of bounds (dropped): their rows may hold a prompt being prefilled.
        write_pos = jnp.where(state.active, state.lengths, cache_len)
        logits, cache = llama.forward(
            params,
            layers,
            cfg,
            state.tokens[:, None],
            cache,
            write_pos=write_pos,
            start=state.starts,
            attn_len=attn_len,
            slot_ids=slot_ids,
            logit_index=first,
            attention_kernel=attention_kernel,
            rope=tuple(jax.lax.dynamic_slice_in_dim(table, i, 1, axis=1) for table in (chunk_cos, chunk_sin)),
        )
        raw_logits = logits
        if rows_penalties is not None:
            logits = apply_penalties(logits, state.sampling, rows_penalties)
        live = state.active
        new_tokens = sample(logits, state.sampling, positions=state.lengths + live - state.starts)
        if rows_penalties is not None:
            rows_penalties = count_tokens(rows_penalties, new_tokens, live)
        logprobs = outputs.logprobs
        if want_logprobs:
            step_logprobs = token_logprobs(raw_logits, new_tokens, MAX_TOP_LOGPROBS)
            logprobs = jax.tree.map(
                lambda all_steps, now: all_steps.at[:, i].set(now), logprobs, step_logprobs
            )
        state = _advanced(state, new_tokens, eos_ids, cache_len)
        outputs = ChunkOutputs(
            outputs.tokens.at[:, i].set(new_tokens), outputs.emitted.at[:, i].set(live), logprobs
        )
        return i + 1, state, cache, rows_penalties, outputs

    started_active = state.active

    def keep_going(carry) -> jax.Array:
        # The chunk ends at the step where a row finishes, so that its slot and its last tokens are
        # released at once rather than idling until the chunk's end (rows only ever leave a chunk).
        i, state = carry[0], carry[1]
        return (i < steps) & jnp.any(state.active) & jnp.all(state.active == started_active)

    # A while loop rather than a scan: it stops as soon as a row finishes.
    outputs = _no_outputs(rows, max_steps, want_logprobs)
    rows_penalties = None if penalties is None else jax.tree.map(lambda table: table[slot_ids], penalties)
    _, state, cache, rows_penalties, outputs = jax.lax.while_loop(
        keep_going, step, (0, state, cache, rows_penalties, outputs)
    )
    if penalties is not None:
        penalties = jax.tree.map(lambda table, rows: table.at[slot_ids].set(rows), penalties, rows_penalties)
    return outputs, state, penalties, cache


class Runner:
    """Owns the parameters on device, the KV cache and the compiled steps."""

    def __init__(
        self,
        cfg: ModelConfig,
        params: Params,
        *,
        slots: int,
        cache_len: int,
        steps_per_call: int,
        eos_ids: tuple[int, ...],
        cache_dtype: jnp.dtype,
        cache_sharding: jax.sharding.Sharding | None = None,
        attention_kernel: bool | None = None,
    ):
        """`attention_kernel`: attend through `cpu_kernels.decode_attention`; by default wherever it
        can (`kernel_fits`)."""
        self.cfg = cfg
        self.params, self.layers = llama.serving_weights(params, cfg)
        self.slots = slots
        self.cache_len = cache_len
        self.steps_per_call = steps_per_call
        self.eos_ids = jnp.asarray(eos_ids, jnp.int32)
        self.shapes_to_compile = 0  # decode shapes `compile_ahead` has yet to compile
        self.cache_dtype = jnp.dtype(cache_dtype)  # the entries' (a bf16 cache is stored as uint16)
        self.cache = llama.init_cache(cfg, slots, cache_len, cache_dtype, cache_sharding)
        if attention_kernel is None:
            attention_kernel = kernel_fits(cfg, cache_dtype, cache_sharding)
        self.attention_kernel = attention_kernel
        # Only rows of requests with repetition penalties are kept up to date (see Engine).
        self.penalties = Penalties(
            jnp.zeros((slots, cfg.vocab_size), jnp.int32), jnp.zeros((slots, cfg.vocab_size), bool)
        )
        # A prompt's rotary tables, computed apart from `_prefill` (`llama.forward`'s `rope`): inside it XLA
        # evaluated cos and sin again in every layer's rotation (docs/performance.md).
        self._rotary = jax.jit(functools.partial(llama.rotary, cfg=cfg))
        self._prefill = jax.jit(
            functools.partial(_prefill, cfg=cfg, attention_kernel=attention_kernel),
            static_argnames=("attn_len", "want_logprobs"),
            donate_argnums=(2, 3),
        )
        self._decode = jax.jit(
            functools.partial(_decode_chunk, cfg=cfg, attention_kernel=attention_kernel),
            static_argnames=("max_steps", "attn_len", "want_logprobs"),
            donate_argnums=(2, 3),
        )

        self._copy_prefix = jax.jit(_copy_prefix, static_argnames="positions", donate_argnums=0)

    @property
    def cache_bytes(self) -> int:
        return self.cache.nbytes

    def prefill(
        self,
        slot: int,
        tokens: list[int],
        *,
        write_pos: int,
        start: int,
        logit_index: int,
        sampling: SamplingArrays,
        penalize_prompt: list[int] | None = None,
        want_logprobs: bool = False,
    ) -> tuple[int, LogprobArrays | None]:
        """Write a (padded) piece of a prompt into `slot` at `write_pos`; return the token sampled after
        the piece's position `logit_index` (meaningful for the prompt's last piece) and, if wanted, its
        logprobs ([1]-row host arrays). `penalize_prompt` (the whole prompt) starts the slot's
        repetition-penalty row and applies it to this token."""
        # The kernel reads each query's own range: one shape per piece length, whatever it attends.
        reach = write_pos + len(tokens)
        attn_len = (
            self.cache_len if self.attention_kernel else fine_bucket(reach, MIN_PROMPT_BUCKET, self.cache_len)
        )
        in_prompt = None
        if penalize_prompt is not None:
            in_prompt = np.zeros((self.cfg.vocab_size,), bool)
            in_prompt[penalize_prompt] = True
        first, logprobs, penalties, self.cache = self._prefill(
            self.params,
            self.layers,
            self.cache,
            self.penalties if penalize_prompt is not None else None,
            np.asarray([tokens], np.int32),
            np.asarray([slot], np.int32),
            np.asarray([write_pos], np.int32),
            np.asarray([start], np.int32),
            np.asarray([logit_index], np.int32),
            sampling,
            in_prompt,
            self._rotary(np.arange(write_pos - start, write_pos - start + len(tokens), dtype=np.int32)[None]),
            attn_len=attn_len,
            want_logprobs=want_logprobs,
        )
        if penalties is not None:
            self.penalties = penalties
        return int(first[0]), jax.device_get(logprobs)

    def copy_prefix(self, source: int, dest: int, tokens: int) -> None:
        """Copy the keys and values of cache row `source`'s first `tokens` positions into row `dest` (and
        up to `copy_bucket(tokens)` positions: the ones past `tokens` are overwritten before anything
        reads them, as `dest` writes its own)."""
        self.cache = self._copy_prefix(
            self.cache, np.int32(source), np.int32(dest), positions=copy_bucket(tokens, self.cache_len)
        )

    def decode_shape(self, state: DecodeState, steps: int) -> tuple[int, int]:
        """The compiled shape a decode chunk over `state`'s active rows uses: (batch rows, attended cache
        length). A row reaches at most its length plus the tokens it may still write in this chunk, so a
        row about to finish does not push the whole batch into a longer bucket. The decode kernel reads
        each row's own range, so with it the attended length is always the whole cache: one shape per
        batch size."""
        active = state.active
        live = max(int(active.sum()), 1)
        if self.attention_kernel:
            return row_bucket(live, self.slots), self.cache_len
        rows = bucket(live, 1, self.slots)
        reach = state.lengths[active] + np.minimum(state.remaining[active], steps)
        furthest = int(reach.max()) if reach.size else 0
        return rows, bucket(furthest, MIN_ATTN_BUCKET, self.cache_len)

    def decode(
        self,
        state: DecodeState,
        steps: int | None = None,
        *,
        penalize: bool = False,
        want_logprobs: bool = False,
    ) -> tuple[ChunkOutputs, DecodeState]:
        """One chunk of up to `steps` (default and at most `steps_per_call`) tokens for the active slots.
        Takes and returns the state of all slots as
        host (numpy) arrays, so the caller may edit rows between chunks; the outputs are host arrays of
        [slots, steps_per_call]. `penalize` applies the slots' repetition penalties; `want_logprobs`
        returns every token's logprobs and the top MAX_TOP_LOGPROBS.

        Only the active slots are computed, gathered into a batch padded to a power of two with idle
        slots, so a lone request costs a batch of one, not `slots` rows."""
        steps = self.steps_per_call if steps is None else min(steps, self.steps_per_call)
        active = np.flatnonzero(state.active)
        idle = np.flatnonzero(~state.active)
        rows, attn_len = self.decode_shape(state, steps)
        slot_ids = np.concatenate([active, idle[: rows - len(active)]]).astype(np.int32)
        sub_state = jax.tree.map(lambda column: column[slot_ids], state)
        outputs, sub_state, penalties, self.cache = self._decode(
            self.params,
            self.layers,
            self.cache,
            self.penalties if penalize else None,
            sub_state,
            self.eos_ids,
            np.int32(steps),
            slot_ids,
            max_steps=self.steps_per_call,
            attn_len=attn_len,
            want_logprobs=want_logprobs,
        )
        if penalties is not None:
            self.penalties = penalties
        outputs, sub_state = jax.device_get((outputs, sub_state))

        def scatter(rows_values: np.ndarray) -> np.ndarray:
            all_rows = np.zeros((self.slots, *rows_values.shape[1:]), rows_values.dtype)
            all_rows[slot_ids] = rows_values
            return all_rows

        new_state = jax.tree.map(np.array, state)  # writable host copies the caller may edit
        for column, rows_after in zip(jax.tree.leaves(new_state), jax.tree.leaves(sub_state), strict=True):
            column[slot_ids] = rows_after
        return jax.tree.map(scatter, outputs), new_state

    def warm_up(self, prompt_buckets: list[int], common_len: int = 256) -> list[tuple[int, int]]:
        """Compile the common shapes now rather than on the first requests: the given prompt buckets,
        every prefix copy; with the decode kernel, decode for every row bucket; without it, decode for
        one request at every context length and every batch size up to `common_len`. Returns the decode shapes (rows,
        attended length) left out, for `compile_ahead`."""
        greedy = sampling_rows(1, temperature=0.0, top_p=1.0, top_k=0, greedy=True, seed=0)
        started = time.perf_counter()
        for size in prompt_buckets:
            self.prefill(0, [0] * size, write_pos=0, start=0, logit_index=0, sampling=greedy)
            log.debug("compiled prefill for %d-token prompts", size)
        log.info(
            "compiled prefill for %d prompt lengths (%d to %d tokens) in %.1f s",
            len(prompt_buckets),
            min(prompt_buckets),
            max(prompt_buckets),
            time.perf_counter() - started,
        )
        started = time.perf_counter()
        copy_sizes = sorted({copy_bucket(n, self.cache_len) for n in range(1, self.cache_len + 1)})
        for size in copy_sizes:
            self.copy_prefix(0, 0, size)  # onto itself: changes nothing
        log.info("compiled %d prefix copies in %.1f s", len(copy_sizes), time.perf_counter() - started)
        started = time.perf_counter()
        if self.attention_kernel:
            every = {(row_bucket(n, self.slots), self.cache_len) for n in range(1, self.slots + 1)}
            common = every
        else:
            lengths = [MIN_ATTN_BUCKET * 2**i for i in range(16) if MIN_ATTN_BUCKET * 2**i < self.cache_len]
            batches = [2**i for i in range(16) if 2**i < self.slots] + [self.slots]
            every = {(b, n) for b in batches for n in [*lengths, self.cache_len]}
            common = {(b, n) for b, n in every if b == 1 or n <= common_len}
        for rows, attn_len in sorted(common):
            self._compile_decode(rows, attn_len)
        log.info("compiled %d decode shapes in %.1f s", len(common), time.perf_counter() - started)
        return sorted(every - common)

    def compile_ahead(self, shapes: list[tuple[int, int]]) -> None:
        """Compile decode chunks of these (rows, attended length) shapes, so that their first use does
        not stall every stream for a compilation (seconds per shape; docs/performance.md). It may run on a
        thread of its own beside the engine (see `_compile_decode`)."""
        started = time.perf_counter()
        self.shapes_to_compile = len(shapes)
        try:
            for rows, attn_len in shapes:
                self._compile_decode(rows, attn_len)
                self.shapes_to_compile -= 1
        finally:
            self.shapes_to_compile = 0
        log.info("compiled %d more decode shapes ahead in %.1f s", len(shapes), time.perf_counter() - started)

    def _compile_decode(self, rows: int, attn_len: int) -> None:
        """Compile the decode chunk for `rows` rows attending `attn_len` entries, without running it.
        Lowering reads only the arrays' shapes, shardings and layouts, which the cache arrays keep even
        once the engine has donated them. (Abstract ShapeDtypeStructs lowered to a different program,
        which the engine's calls then missed.)"""
        self._decode.lower(
            self.params,
            self.layers,
            self.cache,
            None,
            idle_state(rows),
            self.eos_ids,
            np.int32(1),
            np.arange(rows, dtype=np.int32),
            max_steps=self.steps_per_call,
            attn_len=attn_len,
            want_logprobs=False,
        ).compile()


def kernel_fits(
    cfg: ModelConfig, cache_dtype: jnp.dtype, cache_sharding: jax.sharding.Sharding | None
) -> bool:
    """Whether prompts and decoding can use the CPU attention kernel: it is built, reads the cache's dtype
    (float32, float16 or bfloat16), takes the model's head shapes, and sees whole cache rows (a cache split over
    devices would need it run per shard)."""
    split = isinstance(cache_sharding, jax.sharding.NamedSharding) and any(
        axis is not None for axis in cache_sharding.spec
    )
    shapes_fit = cpu_kernels.takes_heads(cfg.num_heads // cfg.num_kv_heads, cfg.head_dim)
    dtype_fits = llama.cache_storage_dtype(cache_dtype) in cpu_kernels.CACHE_TARGETS
    return dtype_fits and shapes_fit and not split and cpu_kernels.available()


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


def idle_state(slots: int) -> DecodeState:
    """Host-side state with every slot inactive."""
    zeros = np.zeros((slots,), np.int32)
    return DecodeState(
        tokens=zeros.copy(),
        lengths=zeros.copy(),
        starts=zeros.copy(),
        remaining=zeros.copy(),
        active=np.zeros((slots,), bool),
        stop_at_eos=np.ones((slots,), bool),
        sampling=sampling_rows(slots, temperature=1.0, top_p=1.0, top_k=0, greedy=True, seed=0),
    )


def set_slot(
    state: DecodeState,
    slot: int,
    *,
    token: int,
    length: int,
    start: int,
    remaining: int,
    stop_at_eos: bool,
    sampling: SamplingArrays,
) -> None:
    """Start decoding in `slot` (edits the host arrays in place); `sampling` holds one row."""
    state.tokens[slot], state.lengths[slot], state.starts[slot] = token, length, start
    state.remaining[slot], state.active[slot], state.stop_at_eos[slot] = remaining, True, stop_at_eos
    for column, row in zip(state.sampling, sampling, strict=True):
        column[slot] = row[0]

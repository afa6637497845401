"""The device side: a slot-structured KV cache and the jitted prefill and decode-chunk steps over it.

A runner owns `slots` cache rows of `cache_len` tokens each. `prefill` writes one prompt into a slot and
samples its first token; `decode_chunk` advances every active slot by up to `steps` tokens inside one
compiled loop, so Python is entered once per chunk. Stop conditions that need no text (EOS, the token
budget, the end of the cache) are evaluated on device; stop strings are the caller's job.

Shapes are bucketed so the number of compilations stays small: prompts are padded to a power of two
(at least `MIN_PROMPT_BUCKET`), and decode attends only over the first `attn_len` cache entries, the
smallest bucket that covers the longest active sequence after the chunk.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxserver.model import llama
from jaxserver.model.config import ModelConfig
from jaxserver.model.llama import KVCache, Params
from jaxserver.model.sampling import SamplingParams, sample

log = logging.getLogger(__name__)

MIN_PROMPT_BUCKET = 16
MIN_ATTN_BUCKET = 64


def bucket(n: int, minimum: int, cap: int) -> int:
    """Smallest power of two >= n (and >= minimum), but never above cap."""
    size = minimum
    while size < n:
        size *= 2
    return min(size, cap)


class DecodeState(NamedTuple):
    """Per-slot decoding state; every field is [slots]."""

    tokens: jax.Array  # int32: the last token, fed to the next step
    lengths: jax.Array  # int32: cache index where the next K/V are written
    starts: jax.Array  # int32: first valid cache index (> 0 only for left-padded prompts)
    remaining: jax.Array  # int32: tokens the slot may still generate
    active: jax.Array  # bool
    stop_at_eos: jax.Array  # bool: False for requests that ignore EOS (benchmarks)
    sampling: SamplingParams


def _prefill(
    params: Params,
    cache: KVCache,
    tokens: jax.Array,
    slot: jax.Array,
    start: jax.Array,
    logit_index: jax.Array,
    sampling: SamplingParams,
    *,
    cfg: ModelConfig,
) -> tuple[jax.Array, KVCache]:
    """tokens [1, P] into cache row `slot` at index 0; returns the sampled first token [1]."""
    attn_len = tokens.shape[1]
    logits, cache = llama.forward(
        params,
        cfg,
        tokens,
        cache,
        write_pos=jnp.zeros((1,), jnp.int32),
        start=start,
        attn_len=attn_len,
        slot_ids=slot,
        logit_index=logit_index,
    )
    prompt_len = logit_index + 1 - start
    return sample(logits, sampling, positions=prompt_len), cache


def _decode_chunk(
    params: Params,
    cache: KVCache,
    state: DecodeState,
    eos_ids: jax.Array,
    *,
    cfg: ModelConfig,
    steps: int,
    attn_len: int,
) -> tuple[jax.Array, jax.Array, DecodeState, KVCache]:
    """Up to `steps` tokens for every active slot. Returns tokens [slots, steps], emitted mask [slots,
    steps] (False where a slot had already finished), the new state and the cache."""
    cache_len = cache.length

    def step(carry):
        i, state, cache, tokens, emitted = carry
        logits, cache = llama.forward(
            params,
            cfg,
            state.tokens[:, None],
            cache,
            write_pos=state.lengths,
            start=state.starts,
            attn_len=attn_len,
            logit_index=jnp.zeros_like(state.lengths),
        )
        live = state.active
        lengths = state.lengths + live
        new_tokens = sample(logits, state.sampling, positions=lengths - state.starts)
        remaining = state.remaining - live
        finished = (
            (jnp.isin(new_tokens, eos_ids) & state.stop_at_eos) | (remaining <= 0) | (lengths >= cache_len)
        )
        state = state._replace(
            tokens=jnp.where(live, new_tokens, state.tokens),
            lengths=lengths,
            remaining=remaining,
            active=live & ~finished,
        )
        return i + 1, state, cache, tokens.at[:, i].set(new_tokens), emitted.at[:, i].set(live)

    def keep_going(carry) -> jax.Array:
        i, state = carry[0], carry[1]
        return (i < steps) & jnp.any(state.active)

    # A while loop rather than a scan: it stops as soon as every slot has finished.
    slots = state.tokens.shape[0]
    tokens = jnp.zeros((slots, steps), jnp.int32)
    emitted = jnp.zeros((slots, steps), bool)
    _, state, cache, tokens, emitted = jax.lax.while_loop(
        keep_going, step, (0, state, cache, tokens, emitted)
    )
    return tokens, emitted, state, cache


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
    ):
        self.cfg = cfg
        self.params = params
        self.slots = slots
        self.cache_len = cache_len
        self.steps_per_call = steps_per_call
        self.eos_ids = jnp.asarray(eos_ids, jnp.int32)
        self.cache = llama.init_cache(cfg, slots, cache_len, cache_dtype)
        if cache_sharding is not None:
            self.cache = jax.device_put(self.cache, cache_sharding)
        self._prefill = jax.jit(functools.partial(_prefill, cfg=cfg), donate_argnums=(1,))
        self._decode = jax.jit(
            functools.partial(_decode_chunk, cfg=cfg),
            static_argnames=("steps", "attn_len"),
            donate_argnums=(1,),
        )

    @property
    def cache_bytes(self) -> int:
        return self.cache.nbytes

    def prompt_bucket(self, prompt_len: int, max_new_tokens: int, left_pad: bool) -> int:
        """Padded prompt length. Left padding occupies cache room, so it may not eat the answer's room."""
        cap = self.cache_len - max_new_tokens if left_pad else self.cache_len
        return max(prompt_len, bucket(prompt_len, MIN_PROMPT_BUCKET, cap))

    def prefill(
        self,
        slot: int,
        prompt: list[int],
        sampling: SamplingParams,
        max_new_tokens: int,
        left_pad: bool,
        pad_id: int,
    ) -> tuple[int, int]:
        """Write `prompt` into `slot`; return (first token, cache start index of the prompt)."""
        n = len(prompt)
        padded = self.prompt_bucket(n, max_new_tokens, left_pad)
        pad = [pad_id] * (padded - n)
        tokens = np.asarray([pad + prompt if left_pad else prompt + pad], np.int32)
        start = padded - n if left_pad else 0
        logit_index = padded - 1 if left_pad else n - 1
        first, self.cache = self._prefill(
            self.params,
            self.cache,
            tokens,
            np.asarray([slot], np.int32),
            np.asarray([start], np.int32),
            np.asarray([logit_index], np.int32),
            sampling,
        )
        return int(first[0]), start

    def attn_bucket(self, longest: int) -> int:
        return bucket(longest + self.steps_per_call, MIN_ATTN_BUCKET, self.cache_len)

    def decode(self, state: DecodeState, longest: int) -> tuple[np.ndarray, np.ndarray, DecodeState]:
        """One chunk for all slots; `longest` is the largest cache length among active slots."""
        tokens, emitted, state, self.cache = self._decode(
            self.params,
            self.cache,
            state,
            self.eos_ids,
            steps=self.steps_per_call,
            attn_len=self.attn_bucket(longest),
        )
        return np.asarray(tokens), np.asarray(emitted), state

    def warm_up(self, prompt_buckets: list[int]) -> None:
        """Compile the common shapes now rather than on the first requests."""
        greedy = sampling_rows(1, temperature=0.0, top_p=1.0, top_k=0, greedy=True, seed=0)
        for size in prompt_buckets:
            started = time.perf_counter()
            self.prefill(0, [0] * size, greedy, 1, left_pad=False, pad_id=0)
            log.info("compiled prefill for %d-token prompts in %.1f s", size, time.perf_counter() - started)
        state = idle_state(self.slots)
        started = time.perf_counter()
        self.decode(state, longest=0)
        log.info(
            "compiled decode (%d steps per call) in %.1f s",
            self.steps_per_call,
            time.perf_counter() - started,
        )


def sampling_rows(
    rows: int, *, temperature: float, top_p: float, top_k: int, greedy: bool, seed: int
) -> SamplingParams:
    return SamplingParams(
        temperature=jnp.full((rows,), temperature, jnp.float32),
        top_p=jnp.full((rows,), top_p, jnp.float32),
        top_k=jnp.full((rows,), top_k, jnp.int32),
        greedy=jnp.full((rows,), greedy),
        key=jnp.tile(jax.random.PRNGKey(seed), (rows, 1)),
    )


def idle_state(slots: int) -> DecodeState:
    zeros = jnp.zeros((slots,), jnp.int32)
    return DecodeState(
        tokens=zeros,
        lengths=zeros,
        starts=zeros,
        remaining=zeros,
        active=jnp.zeros((slots,), bool),
        stop_at_eos=jnp.ones((slots,), bool),
        sampling=sampling_rows(slots, temperature=1.0, top_p=1.0, top_k=0, greedy=True, seed=0),
    )

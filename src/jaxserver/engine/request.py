"""What flows into and out of the engine: requests, their sampling options, and streamed outputs.

A request's outputs travel from the engine thread to its consumer through an `OutputStream`, which a
plain thread iterates (`for out in stream`) or an asyncio task awaits (`async for out in stream`).
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from jaxserver.config import JAXServerConfig
from jaxserver.engine.constraints import Constraint
from jaxserver.errors import BadRequestError, ContextLengthError

FinishReason = Literal["stop", "length", "abort", "error"]
_ids = itertools.count()
MAX_TOP_LOGPROBS = 20
# The engine keeps sampling settings in int32 and float32 arrays; a checked request never reaches it with
# more (a top_k past int32 failed in the engine thread, and with it every request; a temperature past
# float32 became inf).
INT32_MAX = 2**31 - 1
FLOAT32_MAX = 3.4028234663852886e38
MAX_LOGIT_BIAS = 300  # entries of a request's logit_bias, as OpenAI allows


@dataclass(frozen=True)
class SamplingOptions:
    temperature: float = 0.1
    top_p: float = 0.95
    top_k: int = 50
    greedy: bool = False
    seed: int = 556
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one; 0 disables it
    presence_penalty: float = 0.0  # subtracted from the logit of every token already generated
    frequency_penalty: float = 0.0  # subtracted once per earlier occurrence in the generated tokens
    repetition_penalty: float = 1.0  # divides positive (multiplies negative) logits of prompt/output tokens
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit in [-100, 100])

    def __post_init__(self) -> None:
        if not 0 <= self.temperature <= FLOAT32_MAX:
            raise BadRequestError(f"temperature must be in [0, {FLOAT32_MAX:.3g}]", param="temperature")
        if not 0 < self.top_p <= 1:
            raise BadRequestError("top_p must be in (0, 1]", param="top_p")
        if not 0 <= self.top_k <= INT32_MAX:
            raise BadRequestError(f"top_k must be in [0, {INT32_MAX}] (0 disables it)", param="top_k")
        if not -(2**63) <= self.seed < 2**63:
            raise BadRequestError("seed must fit in 64 bits (signed)", param="seed")
        if not 0 <= self.min_p <= 1:
            raise BadRequestError("min_p must be in [0, 1]", param="min_p")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise BadRequestError(f"{name} must be in [-2, 2]", param=name)
        if not 0 < self.repetition_penalty <= FLOAT32_MAX:
            raise BadRequestError(
                f"repetition_penalty must be in (0, {FLOAT32_MAX:.3g}] (1 disables it)",
                param="repetition_penalty",
            )
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise BadRequestError(f"logit_bias takes at most {MAX_LOGIT_BIAS} tokens", param="logit_bias")
        if any(not -100 <= bias <= 100 for _, bias in self.logit_bias):
            raise BadRequestError("logit_bias values must be in [-100, 100]", param="logit_bias")

    @property
    def penalized(self) -> bool:
        """Whether the sampler changes this request's logits first: repetition penalties or a logit bias
        (which only single steps apply, not multi-step decoding)."""
        return bool(
            self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
            or self.logit_bias
        )


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    stop: tuple[str, ...] = ()  # stop strings: the answer ends before the first one
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks)
    logprobs: int | None = None  # None: no log-probabilities; k >= 0: the chosen token's and the top k
    # Seconds from submission after which the engine ends the request ("abort"), waiting or running.
    timeout_s: float | None = None
    constraint: Constraint | None = None  # a grammar the answer must match
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")

    def __post_init__(self) -> None:
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise BadRequestError(f"top logprobs must be in [0, {MAX_TOP_LOGPROBS}]", param="top_logprobs")
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise BadRequestError("timeout must be > 0 seconds", param="timeout")

    @property
    def stepped(self) -> bool:
        """Whether its tokens come from single steps only: multi-step decoding applies no penalties, no
        logit bias and no grammar, and returns no logprobs."""
        return self.sampling.penalized or self.logprobs is not None or self.constraint is not None


def check_prompt_fits(prompt_len: int, context: int) -> None:
    if prompt_len >= context:
        raise ContextLengthError(
            f"the prompt has {prompt_len} tokens but the context (max_length) is {context} tokens, "
            "which must also leave room for at least one new token"
        )


def new_request(
    config: JAXServerConfig,
    vocab_size: int,
    ids: list[int],
    greedy: bool = False,
    max_new_tokens: int | None = None,
    *,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    stop: tuple[str, ...] = (),
    ignore_eos: bool = False,
    logprobs: int | None = None,
    timeout_s: float | None = None,
    constraint: Constraint | None = None,
    **penalties: Any,
) -> GenerationRequest:
    """A checked request for the prompt `ids`: what a client leaves out (None) takes the config's default;
    `penalties` are SamplingOptions' min_p, penalty and logit_bias fields. Raises a `BadRequestError` for
    anything that cannot run."""
    if any(not 0 <= i < vocab_size for i in ids):
        raise BadRequestError(f"token ids must be in [0, {vocab_size})", param="prompt")
    if any(not 0 <= i < vocab_size for i, _ in penalties.get("logit_bias", ())):
        raise BadRequestError(f"logit_bias keys must be token ids in [0, {vocab_size})", param="logit_bias")
    if not ids:
        raise BadRequestError("the prompt is empty", param="prompt")
    check_prompt_fits(len(ids), config.max_length)
    check_stop_strings(stop, config.max_stop_strings, config.max_stop_chars)
    room = config.max_length - len(ids)
    if max_new_tokens is not None and max_new_tokens < 1:
        raise BadRequestError("max_new_tokens must be >= 1", param="max_new_tokens")
    if max_new_tokens is not None and max_new_tokens > room:
        raise ContextLengthError(
            f"the prompt has {len(ids)} tokens and max_new_tokens is {max_new_tokens}, together over the "
            f"context (max_length) of {config.max_length}; ask for at most {room} new tokens",
            param="max_new_tokens",
        )
    sampling = SamplingOptions(
        temperature=config.temperature if temperature is None else temperature,
        top_p=config.top_p if top_p is None else top_p,
        top_k=config.top_k if top_k is None else min(top_k, vocab_size),  # more: all, as 0
        greedy=greedy,
        seed=config.seed if seed is None else seed,
        **penalties,
    )
    return GenerationRequest(
        prompt_ids=ids,
        max_new_tokens=min(max_new_tokens or config.max_new_tokens, room),
        sampling=sampling,
        stop=tuple(stop),
        ignore_eos=ignore_eos,
        logprobs=logprobs,
        timeout_s=timeout_s,
        constraint=constraint,
    )


def check_stop_strings(stop: tuple[str, ...], most: int, longest: int) -> None:
    """Stop strings are searched after every token and their length of text is held back from a stream:
    both are bounded (max_stop_strings, max_stop_chars)."""
    if len(stop) > most:
        raise BadRequestError(f"{len(stop)} stop strings given; at most {most} are allowed", param="stop")
    if any(len(s) > longest for s in stop):
        raise BadRequestError(f"a stop string may have at most {longest} characters", param="stop")


@dataclass(frozen=True)
class TokenLogprobs:
    """Log-probabilities (of the model's distribution before sampling filters) for one generated token."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely tokens and their logprobs, most likely first


@dataclass
class GenerationChunk:
    text: str  # new text since the previous chunk
    token_ids: list[int]  # new tokens since the previous chunk
    tokens_generated: int  # so far, in total
    finish_reason: FinishReason | None = None
    error: str | None = None  # set with finish_reason "error"
    logprobs: list[TokenLogprobs] | None = None  # one per token in token_ids, when the request asked


class OutputStream:
    """Chunks of one request, in order, ending after the chunk that carries a finish reason."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop | None = None):
        self.request = request
        self.submitted_at = time.monotonic()
        self.first_token_at: float | None = None
        self._loop = loop
        self._async_queue: asyncio.Queue | None = asyncio.Queue() if loop else None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()

    def put(self, chunk: GenerationChunk) -> None:
        """Called by the engine thread."""
        if self.first_token_at is None and chunk.token_ids:
            self.first_token_at = time.monotonic()
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._async_queue.put_nowait, chunk)
            except RuntimeError:  # the consumer's event loop has closed: nobody is listening
                pass
        else:
            self._queue.put(chunk)

    def __iter__(self) -> Iterator[GenerationChunk]:
        while True:
            chunk = self._queue.get()
            yield chunk
            if chunk.finish_reason:
                return

    async def __aiter__(self) -> AsyncIterator[GenerationChunk]:
        assert self._async_queue is not None, "created without an event loop"
        while True:
            chunk = await self._async_queue.get()
            yield chunk
            if chunk.finish_reason:
                return

    async def next(self, timeout_s: float) -> GenerationChunk | None:
        """The next chunk, or None after `timeout_s` (lets a caller check for a gone client)."""
        assert self._async_queue is not None, "created without an event loop"
        try:
            return await asyncio.wait_for(self._async_queue.get(), timeout_s)
        except TimeoutError:
            return None

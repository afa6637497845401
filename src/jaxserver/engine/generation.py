"""Generation requests and the streaming loop that serves them on a runner.

One request at a time holds the runner (a lock serialises callers): prefill its prompt into slot 0, then
decode chunk by chunk, yielding a `GenerationChunk` after each with the text that became final.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import jax

from jaxserver.engine.runner import DecodeState, Runner, idle_state, sampling_rows
from jaxserver.errors import BadRequestError, ContextLengthError
from jaxserver.model.sampling import SamplingParams
from jaxserver.model.tokenizer import Tokenizer

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingOptions:
    temperature: float = 0.1
    top_p: float = 0.95
    top_k: int = 50
    greedy: bool = False
    seed: int = 556

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise BadRequestError("temperature must be >= 0", param="temperature")
        if not 0 < self.top_p <= 1:
            raise BadRequestError("top_p must be in (0, 1]", param="top_p")
        if self.top_k < 0:
            raise BadRequestError("top_k must be >= 0 (0 disables it)", param="top_k")


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    ignore_eos: bool = False  # generate exactly max_new_tokens (for benchmarks)


@dataclass
class GenerationChunk:
    text: str  # new text since the previous chunk
    token_ids: list[int]  # new tokens since the previous chunk
    tokens_generated: int  # so far, in total
    finish_reason: FinishReason | None = None


class Generator:
    def __init__(self, runner: Runner, tokenizer: Tokenizer, *, left_pad: bool):
        self.runner = runner
        self.tokenizer = tokenizer
        self.left_pad = left_pad
        self._lock = threading.Lock()

    def check(self, prompt_len: int, max_new_tokens: int) -> None:
        """Reject what cannot fit before any device work."""
        limit = self.runner.cache_len
        if prompt_len == 0:
            raise BadRequestError("the prompt is empty", param="prompt")
        if prompt_len >= limit:
            raise ContextLengthError(
                f"the prompt has {prompt_len} tokens but the context (max_length) is {limit} tokens, "
                "which must also leave room for at least one new token"
            )
        if max_new_tokens < 1:
            raise BadRequestError("max_new_tokens must be >= 1", param="max_new_tokens")

    def stream(self, request: GenerationRequest) -> Iterator[GenerationChunk]:
        n = len(request.prompt_ids)
        self.check(n, request.max_new_tokens)
        budget = min(request.max_new_tokens, self.runner.cache_len - n)
        opts = request.sampling
        sampling = sampling_rows(
            1,
            temperature=opts.temperature,
            top_p=opts.top_p,
            top_k=opts.top_k,
            greedy=opts.greedy,
            seed=opts.seed,
        )
        detok = self.tokenizer.incremental_decoder()
        eos = set() if request.ignore_eos else set(self.tokenizer.eos_token_ids)
        with self._lock:
            first, start = self.runner.prefill(
                0,
                request.prompt_ids,
                sampling,
                budget,
                left_pad=self.left_pad,
                pad_id=self.tokenizer.pad_token_id,
            )
            generated = 1
            if first in eos or budget == 1:
                yield GenerationChunk(
                    detok.push([first]) + detok.flush(), [first], 1, "stop" if first in eos else "length"
                )
                return
            yield GenerationChunk(detok.push([first]), [first], 1)
            state = self._single_slot_state(
                first, start + n, start, budget - 1, sampling, not request.ignore_eos
            )
            while True:
                tokens, emitted, state = self.runner.decode(state, longest=start + n + generated)
                new = [int(t) for t, e in zip(tokens[0], emitted[0], strict=True) if e]
                generated += len(new)
                finish: FinishReason | None = None
                if new and new[-1] in eos:
                    finish = "stop"
                elif generated >= budget:
                    finish = "length"
                text = detok.push(new) + (detok.flush() if finish else "")
                yield GenerationChunk(text, new, generated, finish)
                if finish:
                    return

    def _single_slot_state(
        self, token: int, length: int, start: int, remaining: int, sampling: SamplingParams, stop_at_eos: bool
    ) -> DecodeState:
        state = idle_state(self.runner.slots)

        def put(arr: jax.Array, value: int | bool) -> jax.Array:
            return arr.at[0].set(value)

        return DecodeState(
            tokens=put(state.tokens, token),
            lengths=put(state.lengths, length),
            starts=put(state.starts, start),
            remaining=put(state.remaining, remaining),
            active=put(state.active, True),
            stop_at_eos=put(state.stop_at_eos, stop_at_eos),
            sampling=jax.tree.map(lambda full, row: full.at[0].set(row[0]), state.sampling, sampling),
        )

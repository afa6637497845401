"""The engine: one background thread that owns the runner (model, KV cache) and serves every request.

Life of a request:

1. `submit` (any thread) counts the request against the waiting limit (`OverloadedError` when full), puts
   it in the inbox and returns its `OutputStream`. `abort` puts a cancellation in the same inbox.
2. The engine thread loops:
   a. inbox: new requests join the waiting queue; aborts finish their request, and so does a request's
      timeout, checked here;
   b. schedule: waiting requests take free slots, oldest first;
   c. prefill: a prompt's start that another slot holds is copied over (prefix caching), then pieces of
      at most `prefill_chunk_tokens` are written into their slots; while other slots are decoding, up to
      `prefill_budget_tokens` per iteration, so that prompts never stall them for long.
      A prompt's last piece samples its first token, and the slot joins the decode batch;
   d. decode: one compiled call advances every decoding slot by up to `max_compile_tokens` tokens
      (fewer while prompts wait, so that they are admitted sooner; and it ends at the step where a
      request finishes, so that its slot is free and its client has its answer at once);
   e. emit: new tokens are detokenized, stop strings checked, and a chunk goes to each request's stream.
3. `_finish(item, reason)` is the only way out: EOS or a stop string ("stop"), the token budget or the
   context ("length"), `abort` (client gone, shutdown, timeout) and engine failure ("error") all end
   there. It sends the final chunk, deactivates the slot on the device side and frees it in the scheduler.

Only the engine thread touches the scheduler, the decode state and the runner; other threads talk to it
through the inbox and read outputs from their streams. A cancellation or a timeout takes effect at the
next loop iteration, so within one decode chunk.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from jaxserver.engine.request import (
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    OutputStream,
    TokenLogprobs,
    check_prompt_fits,
)
from jaxserver.engine.runner import Runner, idle_state, prompt_bucket, sampling_rows, set_slot
from jaxserver.engine.scheduler import Scheduler, Sequence
from jaxserver.errors import EngineError, NotReadyError, OverloadedError
from jaxserver.model.sampling import LogprobArrays
from jaxserver.model.tokenizer import Tokenizer

log = logging.getLogger(__name__)

RATE_WINDOW_S = 60.0
# Decode steps per chunk while prompts wait to be prefilled: short chunks let prefills interleave with
# decoding (admission waits for the end of the running chunk), yet amortise each chunk's fixed cost
# (cutting the cache windows and writing them back, the host round trip).
ADMISSION_CHUNK_STEPS = 8


@dataclass
class StepTotals:
    """Where the engine thread's time went since it started, summed over its calls to the runner; read by
    /status, /metrics and the benchmarks, whose profile is the difference between two readings."""

    prefill_seconds: float = 0.0
    prefill_calls: int = 0
    prompt_tokens: int = 0  # prompt tokens written into the cache
    prompt_tokens_computed: int = 0  # the same with the padding of their buckets
    prompt_tokens_reused: int = 0  # prompt tokens found in the cache, left by earlier requests
    prompt_tokens_copied: int = 0  # those of them copied from another request's slot
    decode_seconds: float = 0.0
    decode_calls: int = 0
    decode_steps: int = 0  # forward passes of the decode batch
    decode_tokens: int = 0  # tokens those steps generated
    decode_rows_computed: int = 0  # rows those steps computed, idle padding rows included


class Engine:
    def __init__(
        self,
        runner: Runner,
        tokenizer: Tokenizer,
        *,
        max_waiting: int,
        prefill_chunk_tokens: int,
        prefill_budget_tokens: int,
        left_pad: bool,
        reuse_prefixes: bool,
    ):
        self.runner = runner
        self.tokenizer = tokenizer
        self.max_waiting = max_waiting
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.prefill_budget_tokens = prefill_budget_tokens
        self.left_pad = left_pad
        self.scheduler = Scheduler(runner.slots, runner.cache_len, reuse_prefixes)
        self.state = idle_state(runner.slots)
        self.error: str | None = None
        self.finished: Counter[str] = Counter()  # finish reason -> requests
        self.tokens_generated = 0
        self.totals = StepTotals()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._outstanding = 0  # submitted and not yet finished
        self._outstanding_lock = threading.Lock()
        self._accepting = True
        self._stopping = False
        self._recent_tokens: deque[tuple[float, int]] = deque()
        self._thread = threading.Thread(target=self._run, name="jaxserver-engine", daemon=True)

    # --- the public surface (any thread) ------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def submit(
        self, request: GenerationRequest, loop: asyncio.AbstractEventLoop | None = None
    ) -> OutputStream:
        """Queue a request; its chunks arrive on the returned stream (async when `loop` is given)."""
        check_prompt_fits(len(request.prompt_ids), self.runner.cache_len)
        if self.error is not None:
            raise EngineError(f"the engine has stopped after an error: {self.error}")
        if not self._accepting:
            raise NotReadyError("the server is shutting down")
        with self._outstanding_lock:
            if self._outstanding >= self.runner.slots + self.max_waiting:
                raise OverloadedError(
                    f"all {self.runner.slots} slots are busy and {self.max_waiting} requests are already "
                    "waiting; retry shortly"
                )
            self._outstanding += 1
        stream = OutputStream(request, loop)
        self._inbox.put(("submit", stream))
        return stream

    def abort(self, request_id: str) -> None:
        """End a request early (e.g. its client went away); a no-op if it already finished."""
        self._inbox.put(("abort", request_id))

    def stop_accepting(self) -> None:
        """New requests get NotReadyError (503) from now on; running ones go on."""
        self._accepting = False

    def shutdown(self, drain_timeout_s: float = 30.0) -> None:
        """Stop admitting, let running requests finish for up to `drain_timeout_s`, abort the rest."""
        self.stop_accepting()
        deadline = time.monotonic() + drain_timeout_s
        while self._thread.is_alive() and not self.scheduler.idle and time.monotonic() < deadline:
            time.sleep(0.05)
        self._stopping = True
        self._inbox.put(("wake", None))
        self._thread.join(timeout=30)

    def stats(self) -> dict[str, Any]:
        now = time.monotonic()
        recent = sum(n for t, n in list(self._recent_tokens) if now - t <= RATE_WINDOW_S)
        return {
            "slots": self.runner.slots,
            "active_slots": self.scheduler.busy_slots,
            "waiting_requests": max(0, self._outstanding - self.scheduler.busy_slots),
            "tokens_per_s_last_minute": round(recent / RATE_WINDOW_S, 2),
            "requests_finished": dict(self.finished),
            "tokens_generated": self.tokens_generated,
            "kv_cache_bytes": self.runner.cache_bytes,
            "kv_cache_dtype": self.runner.cache_dtype.name,
            "decode_shapes_compiling": self.runner.shapes_to_compile,
            "step_totals": asdict(self.totals),
            "engine_error": self.error,
        }

    # --- the loop (engine thread only) ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._take_inbox(block=self.scheduler.idle)
                self._end_overdue(time.monotonic())
                for seq in self.scheduler.admit(self.tokenizer.incremental_decoder):
                    self.totals.prompt_tokens_reused += seq.prefilled  # found in the slot
                self._prefill()
                if self.scheduler.decoding:
                    self._decode()
            self._take_inbox(block=False)
            for item in self.scheduler.all_requests():
                self._finish(item, "abort")
        except Exception as exc:  # every failure must reach the waiting clients
            log.exception("engine failed")
            self.error = f"{type(exc).__name__}: {exc}"
            for item in self.scheduler.all_requests():
                self._finish(item, "error", error=self.error)
            self._fail_inbox()

    def _take_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, payload = item
            if kind == "submit":
                self.scheduler.waiting.append(payload)
            elif kind == "abort":
                found = self.scheduler.find(payload)
                if found is not None:
                    self._finish(found, "abort")
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _end_overdue(self, now: float) -> None:
        """End ("abort") every request whose timeout has passed at `now`, wherever it is."""
        for item in self.scheduler.all_requests():
            stream = item if isinstance(item, OutputStream) else item.stream
            timeout = stream.request.timeout_s
            if timeout is not None and now - stream.submitted_at >= timeout:
                log.info("request %s reached its timeout of %g s", stream.request.request_id, timeout)
                self._finish(item, "abort")

    def _fail_inbox(self) -> None:
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "submit":
                self._finish(payload, "error", error=self.error)

    def _prefill(self) -> None:
        """Write prompt pieces; up to the budget per iteration while others decode. A budget of several
        pieces refills the batch sooner after requests finish, for more output tokens/s at the price of
        longer pauses for running streams (docs/performance.md, "Prefill budget")."""
        budget = self.prefill_budget_tokens
        while self.scheduler.prefilling and (budget > 0 or not self.scheduler.decoding):
            seq = self.scheduler.prefilling[0]
            self._copy_shared_start(seq)
            written, token, logprobs = self._prefill_piece(seq)
            budget -= written
            if seq.prefill_done:
                self._start_decoding(seq, token, logprobs)

    def _copy_shared_start(self, seq: Sequence) -> None:
        """Copy the entries of the prompt's start from another slot that holds more of it than `seq`'s
        own (`Scheduler.donor`): decided right before a piece, so that a prompt prefilled a moment ago
        (requests with one system prompt that arrive together) counts."""
        donor = self.scheduler.donor(seq)
        if donor is not None:
            slot, start, held = donor
            self.runner.copy_prefix(slot, seq.slot, start + held)
            self.totals.prompt_tokens_reused += held - seq.prefilled
            self.totals.prompt_tokens_copied += held - seq.prefilled
            seq.start, seq.prefilled = start, held

    def _prefill_piece(self, seq: Sequence) -> tuple[int, int, list[TokenLogprobs] | None]:
        """Write the next piece of the prompt; return (prompt tokens written, token sampled after them,
        its logprobs if the request asked and this was the last piece)."""
        request = seq.request
        prompt, pad = request.prompt_ids, self.tokenizer.pad_token_id
        sampling = sampling_rows(1, **vars(request.sampling))
        if seq.prefilled == 0 and self.left_pad and len(prompt) <= self.prefill_chunk_tokens:
            # Left padding takes cache room, so it may not eat into the answer's budget.
            room = self.runner.cache_len - request.max_new_tokens
            padded = max(len(prompt), prompt_bucket(len(prompt), room))
            seq.start = padded - len(prompt)
            tokens, write_pos, logit_index = [pad] * seq.start + prompt, 0, padded - 1
            piece = len(prompt)
        else:
            part = prompt[seq.prefilled : seq.prefilled + self.prefill_chunk_tokens]
            padded = prompt_bucket(len(part), self.prefill_chunk_tokens)
            tokens, logit_index = part + [pad] * (padded - len(part)), len(part) - 1
            write_pos = seq.start + seq.prefilled
            piece = len(part)
        last = seq.prefilled + piece >= len(prompt)
        want_logprobs = last and request.logprobs is not None
        started = time.perf_counter()
        token, logprobs = self.runner.prefill(
            seq.slot,
            tokens,
            write_pos=write_pos,
            start=seq.start,
            logit_index=logit_index,
            sampling=sampling,
            penalize_prompt=prompt if last and request.sampling.penalized else None,
            want_logprobs=want_logprobs,
        )
        seq.prefilled += piece
        self.totals.prefill_seconds += time.perf_counter() - started
        self.totals.prefill_calls += 1
        self.totals.prompt_tokens += piece
        self.totals.prompt_tokens_computed += len(tokens)
        return piece, token, _listed([token], logprobs, request.logprobs) if want_logprobs else None

    def _start_decoding(self, seq: Sequence, first_token: int, logprobs: list[TokenLogprobs] | None) -> None:
        request = seq.request
        self.scheduler.start_decoding(seq)
        set_slot(
            self.state,
            seq.slot,
            token=first_token,
            length=seq.start + len(request.prompt_ids),
            start=seq.start,
            remaining=request.max_new_tokens - 1,
            stop_at_eos=not request.ignore_eos,
            sampling=sampling_rows(1, **vars(request.sampling)),
        )
        self._emit(seq, [first_token], logprobs)

    def _decode(self) -> None:
        decoding = self.scheduler.decoding
        admitting = self.scheduler.prefilling or (self.scheduler.waiting and self.scheduler.free_slots)
        steps = ADMISSION_CHUNK_STEPS if admitting else self.runner.steps_per_call
        rows, _ = self.runner.decode_shape(self.state, steps)
        started = time.perf_counter()
        outputs, self.state = self.runner.decode(
            self.state,
            steps,
            penalize=any(seq.request.sampling.penalized for seq in decoding.values()),
            want_logprobs=any(seq.request.logprobs is not None for seq in decoding.values()),
        )
        steps_run = int(outputs.emitted.any(axis=0).sum())
        self.totals.decode_seconds += time.perf_counter() - started
        self.totals.decode_calls += 1
        self.totals.decode_steps += steps_run
        self.totals.decode_tokens += int(outputs.emitted.sum())
        self.totals.decode_rows_computed += rows * steps_run
        for slot, seq in list(decoding.items()):
            emitted = outputs.emitted[slot]
            new = outputs.tokens[slot][emitted].tolist()
            if not new:
                continue
            logprobs = None
            if seq.request.logprobs is not None:
                row = LogprobArrays(*(column[slot][emitted] for column in outputs.logprobs))
                logprobs = _listed(new, row, seq.request.logprobs)
            self._emit(seq, new, logprobs)

    def _emit(self, seq: Sequence, new_tokens: list[int], logprobs: list[TokenLogprobs] | None) -> None:
        """Detokenize new tokens, apply stop conditions, send the chunk; finish the request if it ended."""
        request = seq.request
        self._recent_tokens.append((time.monotonic(), len(new_tokens)))
        while self._recent_tokens and time.monotonic() - self._recent_tokens[0][0] > RATE_WINDOW_S:
            self._recent_tokens.popleft()
        seq.generated += new_tokens
        self.tokens_generated += len(new_tokens)
        reason: FinishReason | None = None
        if not request.ignore_eos and new_tokens[-1] in self.tokenizer.eos_token_ids:
            reason = "stop"
        elif len(seq.generated) >= request.max_new_tokens:
            reason = "length"
        seq.detokenizer.push(new_tokens)
        if reason:
            seq.detokenizer.flush()
        text = seq.detokenizer.text
        held_back = 0
        if request.stop:
            longest_stop = max(map(len, request.stop))
            search_from = max(0, seq.emitted_chars - longest_stop + 1)
            hits = [i for i in (text.find(s, search_from) for s in request.stop) if i >= 0]
            if hits:
                text, reason = text[: min(hits)], "stop"
            elif not reason:
                held_back = longest_stop - 1  # could be the start of a stop string
        end = max(seq.emitted_chars, len(text) - held_back)
        delta, seq.emitted_chars = text[seq.emitted_chars : end], end
        chunk = GenerationChunk(delta, new_tokens, len(seq.generated), reason, logprobs=logprobs)
        if reason:
            self._finish(seq, reason, last=chunk)
        else:
            seq.stream.put(chunk)

    def _finish(
        self,
        item: Sequence | OutputStream,
        reason: FinishReason,
        error: str | None = None,
        last: GenerationChunk | None = None,
    ) -> None:
        """Free the request's slot and capacity, then send its last chunk (`last`, or an empty one), so a
        client that reacts to the end at once finds the capacity free."""
        with self._outstanding_lock:
            self._outstanding -= 1
        self.scheduler.release(item)
        self.finished[reason] += 1
        if isinstance(item, OutputStream):
            item.put(last or GenerationChunk("", [], 0, reason, error=error))
            return
        self.state.active[item.slot] = False
        item.stream.put(last or GenerationChunk("", [], len(item.generated), reason, error=error))


def _listed(tokens: list[int], arrays: LogprobArrays, top: int) -> list[TokenLogprobs]:
    """Host logprob arrays (one row per token in `tokens`) as TokenLogprobs with `top` alternatives."""
    chosen, top_ids, top_values = (np.asarray(column) for column in arrays)
    return [
        TokenLogprobs(
            token, float(chosen[i]), list(zip(top_ids[i, :top].tolist(), top_values[i, :top].tolist()))
        )
        for i, token in enumerate(tokens)
    ]

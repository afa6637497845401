"""The engine: one background thread that owns the runner (model, paged KV cache) and serves every request.

Life of a request:

1. `submit` (any thread) checks that the request can ever fit the pool, counts it against the waiting
   limit (`OverloadedError` when full), wraps it in a `Sequence` with its `OutputStream`, puts it in the
   inbox and returns the stream. `abort` puts a cancellation in the same inbox.
2. The engine thread loops:
   a. inbox: new sequences join the scheduler's queue; aborts finish their sequence, and so does a
      request's timeout, checked here;
   b. schedule: the scheduler plans one step under its token budget: a token for every decoding sequence,
      pieces of prompts beside them, waiting requests admitted (from the prefix cache) while rows, budget
      and pages last, the newest running sequence preempted when pages run out;
   c. run: a plan with prompt tokens is one ragged step; a plan of decode tokens only runs up to
      `max_compile_tokens` steps in one call, which ends at the step where a sequence finishes;
   d. postprocess (`outputs.py`): new tokens are detokenized, stop strings checked, and a chunk goes to
      each stream.
3. `_finish(seq, reason)` is the only way out: EOS or a stop string ("stop"), the token budget or the
   context ("length"), `abort` (client gone, shutdown, timeout) and engine failure ("error") all end there.
   It frees the sequence's row and pages, then sends the final chunk.
4. An exception in the loop fails the engine for good: every request ends with "error", new ones are
   refused, and `on_failure` is called (`jaxserver serve` exits, so that its supervisor restarts it).
   Clients get `ENGINE_FAILED`; the exception itself goes to the log only.

Only the engine thread touches the scheduler and the runner; other threads talk to it through the inbox
and read outputs from their streams. A cancellation or a timeout takes effect at the next loop iteration,
so within one call.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import numpy as np

from jaxserver.engine import outputs
from jaxserver.engine.constraints import GrammarCompiler, bitmask_words
from jaxserver.engine.page_pool import PagePool
from jaxserver.engine.programs import decode_rows
from jaxserver.engine.request import (
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    OutputStream,
    TokenLogprobs,
    check_prompt_fits,
)
from jaxserver.engine.runner import Runner
from jaxserver.engine.scheduler import Scheduler, Sequence, StepPlan
from jaxserver.engine.step_relay import TokensByRow
from jaxserver.engine.totals import StepTotals
from jaxserver.errors import BadRequestError, EngineError, NotReadyError, OverloadedError
from jaxserver.model import paged
from jaxserver.model.tokenizer import Tokenizer

log = logging.getLogger(__name__)

RATE_WINDOW_S = 60.0
ENGINE_FAILED = "the engine failed; the server log has the details"
# A multi-step decode call holds back every stream's tokens until it returns, and a waiting prompt's start:
# it takes as many steps as last lasted about this long at its batch size.
DECODE_CALL_S = 0.5


class Engine:
    def __init__(
        self,
        runner: Runner,
        tokenizer: Tokenizer,
        *,
        max_waiting: int,
        prefix_caching: bool = True,
        stall_timeout_s: float = 60.0,
    ):
        self.runner = runner
        self.tokenizer = tokenizer
        self.max_waiting = max_waiting
        pool = PagePool(runner.pages, paged.PAGE_TOKENS, prefix_caching)
        self.scheduler = Scheduler(pool, runner.max_num_seqs, runner.max_num_batched_tokens)
        self.grammars = GrammarCompiler(tokenizer, runner.cfg.vocab_size)
        self.error: str | None = None  # why the engine failed (for the log and the operator, not clients)
        self.on_failure: Callable[[str], None] | None = None  # called once, from the failing thread
        self.stall_timeout_s = stall_timeout_s
        self._loop_at = time.monotonic()  # when the loop last began an iteration
        self._failing = threading.Lock()  # orders failure and shutdown against submissions: none is lost
        self._closed = False  # the loop has ended: no more submissions
        self.finished: Counter[str] = Counter()  # finish reason -> requests
        self.tokens_generated = 0
        self.totals = StepTotals()
        self._step_seconds: dict[int, float] = {}  # a decode step's last measured time, by rows computed
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._by_id: dict[str, Sequence] = {}  # the engine thread's: every sequence not yet finished
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

    @property
    def accepting(self) -> bool:
        """False from the start of a shutdown (its drain) on."""
        return self._accepting

    def stalled_for(self) -> float | None:
        """Seconds since the loop last moved, when that is over `stall_timeout_s` (a step hangs); else
        None. An idle loop moves every half second."""
        quiet = time.monotonic() - self._loop_at
        return quiet if self._thread.is_alive() and quiet > self.stall_timeout_s else None

    def submit(
        self, request: GenerationRequest, loop: asyncio.AbstractEventLoop | None = None
    ) -> OutputStream:
        """Queue a request; its chunks arrive on the returned stream (async when `loop` is given)."""
        check_prompt_fits(len(request.prompt_ids), self.runner.max_length)
        try:
            self.scheduler.check_fits(request)
        except ValueError as exc:
            raise BadRequestError(f"{exc}; ask for fewer max_new_tokens", param="max_new_tokens") from exc
        if not self._accepting:
            raise NotReadyError("the server is shutting down")
        limit = self.runner.max_num_seqs + self.max_waiting
        with self._outstanding_lock:
            if self._outstanding >= limit:
                raise OverloadedError(
                    f"the server is full: {self.runner.max_num_seqs} requests are running and "
                    f"{self.max_waiting} are already waiting; retry shortly"
                )
            self._outstanding += 1
        try:
            stream = OutputStream(request, loop)
            seq = Sequence(request, stream, self.tokenizer.incremental_decoder())
            if request.constraint is not None:
                seq.matcher = self.grammars.matcher(request.constraint)
            with self._failing:  # the inbox is drained after this put, or this sees why it will not be
                if self.error is not None:
                    raise EngineError(ENGINE_FAILED)
                if self._closed:
                    raise NotReadyError("the server is shutting down")
                self._inbox.put(("submit", seq))
        except BaseException:
            with self._outstanding_lock:
                self._outstanding -= 1
            raise
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
        while self._thread.is_alive() and self._outstanding and time.monotonic() < deadline:
            time.sleep(0.05)
        self._stopping = True
        self._inbox.put(("wake", None))
        self._thread.join(timeout=30)

    def fail(self, reason: str) -> None:
        """End every request with an error and accept no more, from any thread: for a failure the engine
        thread cannot handle itself, since it may wait forever in a call (another process of the group is
        gone). The process is expected to exit soon after."""
        if not self._set_error(reason):
            return
        for seq in list(self._by_id.values()):
            seq.stream.put(GenerationChunk("", [], len(seq.generated), "error", error=ENGINE_FAILED))
        self._fail_inbox()
        self._notify_failure()

    def stats(self) -> dict[str, Any]:
        now = time.monotonic()
        recent = sum(n for t, n in list(self._recent_tokens) if now - t <= RATE_WINDOW_S)
        running = len(self.scheduler.running)
        pool = self.scheduler.pool
        return {
            "max_num_seqs": self.runner.max_num_seqs,
            "running_requests": running,
            "waiting_requests": max(0, self._outstanding - running),
            "tokens_per_s_last_minute": round(recent / RATE_WINDOW_S, 2),
            "requests_finished": dict(self.finished),
            "tokens_generated": self.tokens_generated,
            "kv_cache": {
                "page_tokens": pool.page_tokens,
                "pages_total": len(pool.pages),
                "pages_free": pool.free_pages,
                "pages_cached": pool.cached_pages,
                "bytes": self.runner.cache_bytes,
                "dtype": self.runner.cache_dtype.name,
            },
            "prefix_cache_hit_pages": self.scheduler.prefix_hit_pages,
            "preemptions": self.scheduler.preemptions,
            "programs_compiling": self.runner.programs_to_compile,
            "step_totals": asdict(self.totals),
            "engine_failed": self.error is not None,
            "seconds_since_step": round(time.monotonic() - self._loop_at, 1),
        }

    # --- the loop (engine thread only) ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._loop_at = time.monotonic()
                self._take_inbox(block=self.scheduler.idle)
                self._end_overdue(time.monotonic())
                plan = self.scheduler.schedule(self.runner.token_budget)
                if plan.pieces:
                    self._run_plan(plan)
                elif self.scheduler.idle:
                    self.runner.idle()
            with self._failing:  # from here on a submission is refused, not left in the inbox
                self._closed = True
            self._take_inbox(block=False)
            for seq in self.scheduler.sequences():
                self._finish(seq, "abort")
        except Exception as exc:  # every failure must reach the waiting clients
            log.exception("the engine failed; ending every request")
            if not self._set_error(f"{type(exc).__name__}: {exc}"):
                return
            for seq in list(self._by_id.values()):
                self._finish(seq, "error", error=ENGINE_FAILED)
            self._fail_inbox()
            self._notify_failure()

    def _set_error(self, reason: str) -> bool:
        """Record the first failure; False when the engine had already failed."""
        with self._failing:
            if self.error is not None:
                return False
            self.error = reason
            return True

    def _notify_failure(self) -> None:
        if self.on_failure is not None:
            try:
                self.on_failure(self.error or "")
            except Exception:
                log.exception("the engine's failure callback failed")

    def _take_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, payload = item
            if kind == "submit":
                self._by_id[payload.request.request_id] = payload
                self.scheduler.add(payload)
            elif kind == "abort":
                found = self._by_id.get(payload)
                if found is not None:
                    self._finish(found, "abort")
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _end_overdue(self, now: float) -> None:
        """End ("abort") every request whose timeout has passed at `now`, waiting or running."""
        for seq in self.scheduler.sequences():
            timeout = seq.request.timeout_s
            if timeout is not None and now - seq.stream.submitted_at >= timeout:
                log.info("request %s reached its timeout of %g s", seq.request.request_id, timeout)
                self._finish(seq, "abort")

    def _fail_inbox(self) -> None:
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "submit":
                self._finish(payload, "error", error=ENGINE_FAILED)

    def _run_plan(self, plan: StepPlan) -> None:
        """Run a plan, count it, and emit what it generated."""
        decode_only = all(piece.end - piece.start == 1 and piece.samples for piece in plan.pieces)
        plain = not any(piece.seq.request.stepped for piece in plan.pieces)
        started = time.perf_counter()
        ended: dict[int, GenerationChunk] = {}  # the last chunks of pieces that ended while streamed
        if decode_only and plain and self.runner.max_decode_steps > 1 and self.runner.can_decode(plan):
            outputs, steps_run, rows, generated = self._decode(plan, ended)
        else:
            sampled = self.runner.step(plan, self._token_masks(plan))
            self.scheduler.computed(plan)
            outputs = {i: ([token], None if lp is None else [lp]) for i, (token, lp) in sampled.items()}
            steps_run, rows, generated = 1, self.runner.shape(plan)[1], len(outputs)
        self.totals.prompt_tokens_reused = self.scheduler.prefix_hit_pages * paged.PAGE_TOKENS
        seconds = time.perf_counter() - started
        if decode_only:
            self.totals.add_decode(seconds, steps_run, rows, generated)
        else:
            self.totals.add_prefill(plan, seconds, self.runner.shape(plan)[0])
        for index, (tokens, logprobs) in outputs.items():
            self._emit(plan.pieces[index].seq, tokens, logprobs)
        for index, chunk in ended.items():
            self._finish(plan.pieces[index].seq, chunk.finish_reason, last=chunk)

    def _decode(
        self, plan: StepPlan, ended: dict[int, GenerationChunk]
    ) -> tuple[dict[int, tuple[list[int], None]], int, int, int]:
        """One multi-step decode call whose tokens reach the streams as it runs; the tokens left to emit
        after it by piece, the steps it ran, the rows it computed and the tokens it generated. A piece
        that ended while streamed (EOS, a stop string, its budget) leaves its last chunk in `ended`, to be
        finished once the call no longer uses its pages."""
        rows = decode_rows(len(plan.pieces), self.runner.max_num_seqs)
        steps = self.scheduler.reserve(plan, self._decode_steps_for(rows))
        streamed: Counter[int] = Counter()

        def stream(new_tokens: TokensByRow) -> None:
            for index, tokens in new_tokens.items():
                if index not in ended:
                    seq = plan.pieces[index].seq
                    streamed[index] += len(tokens)
                    chunk = self._take(seq, tokens, None)
                    if chunk.finish_reason:
                        ended[index] = chunk
                    else:
                        seq.stream.put(chunk)

        started = time.perf_counter()
        generated = self.runner.decode(plan, steps, stream)
        self.scheduler.computed(plan, {i: plan.pieces[i].start + len(t) for i, t in generated.items()})
        steps_run = max(map(len, generated.values()), default=0)
        if steps_run:
            self._step_seconds[rows] = (time.perf_counter() - started) / steps_run
        outputs = {
            i: (tokens[streamed[i] :], None)
            for i, tokens in generated.items()
            if i not in ended and len(tokens) > streamed[i]
        }
        return outputs, steps_run, rows, sum(map(len, generated.values()))

    def _token_masks(self, plan: StepPlan) -> np.ndarray | None:
        """The bitmask of allowed next tokens of each piece, or None when no piece samples under a
        grammar."""
        constrained = [(i, p.seq.matcher) for i, p in enumerate(plan.pieces) if p.seq.matcher and p.samples]
        if not constrained:
            return None
        masks = np.full((len(plan.pieces), bitmask_words(self.grammars.vocab_size)), -1, np.int32)
        for index, matcher in constrained:
            matcher.fill_mask(masks, index)
        return masks

    def _decode_steps_for(self, rows: int) -> int:
        """Steps for a decode call of `rows` rows to last about DECODE_CALL_S (4 until one was timed)."""
        step_s = self._step_seconds.get(rows)
        steps = 4 if step_s is None else int(DECODE_CALL_S / step_s)
        return max(1, min(steps, self.runner.max_decode_steps))

    def _emit(self, seq: Sequence, new_tokens: list[int], logprobs: list[TokenLogprobs] | None) -> None:
        """Send the chunk of new tokens; finish the request if it ended."""
        chunk = self._take(seq, new_tokens, logprobs)
        if chunk.finish_reason:
            self._finish(seq, chunk.finish_reason, last=chunk)
        else:
            seq.stream.put(chunk)

    def _take(
        self, seq: Sequence, new_tokens: list[int], logprobs: list[TokenLogprobs] | None
    ) -> GenerationChunk:
        chunk = outputs.take_tokens(
            seq, new_tokens, logprobs, self.tokenizer.eos_token_ids, self.runner.max_length
        )
        self._count_tokens(len(chunk.token_ids))
        return chunk

    def _count_tokens(self, count: int) -> None:
        now = time.monotonic()
        self.tokens_generated += count
        self._recent_tokens.append((now, count))
        while self._recent_tokens and now - self._recent_tokens[0][0] > RATE_WINDOW_S:
            self._recent_tokens.popleft()

    def _finish(
        self,
        seq: Sequence,
        reason: FinishReason,
        error: str | None = None,
        last: GenerationChunk | None = None,
    ) -> None:
        """Free the sequence's row, pages and capacity, then send its last chunk (`last`, or an empty one),
        so a client that reacts to the end at once finds the capacity free."""
        with self._outstanding_lock:
            self._outstanding -= 1
        self._by_id.pop(seq.request.request_id, None)
        self.scheduler.finish(seq)
        self.finished[reason] += 1
        seq.stream.put(last or GenerationChunk("", [], len(seq.generated), reason, error=error))

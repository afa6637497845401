"""Tokens out of a multi-step decode call while it runs, so that streams follow generation token by token
although the call returns only after many steps.

The compiled decode loop reports each step's tokens through a host callback (`report_step`) and its end
(`report_done`). XLA's CPU client runs a program with host callbacks to completion inside the call, so
the call runs on a worker thread while the caller's thread (the engine's, which alone touches requests)
takes the reports and hands them on. The step that hands tokens on waits in its callback until they are:
Python work beside a running step takes a core from its two-thread operations and slows the whole step
(docs/performance.md).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np

T = TypeVar("T")
TokensByRow = dict[int, list[int]]
# Tokens are handed on at most this often per sequence in the call: each hand-on becomes an event per
# stream, whose handling (server and client) runs beside the steps and slows them, so the interval grows
# with the streams to keep the events per second bounded (docs/performance.md).
RELAY_INTERVAL_S = 0.04
_DONE = None
HAND_ON_WAIT_S = 10.0  # a step waits at most this long for the tokens it reported to be handed on


class StepRelay:
    def __init__(self) -> None:
        self._reports: queue.SimpleQueue = queue.SimpleQueue()
        self._caller = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jaxserver-decode")
        self._handed_on = time.monotonic()
        self._interval = RELAY_INTERVAL_S

    def report_step(self, tokens: np.ndarray, active: np.ndarray) -> None:
        """The host callback of one decode step: the token of every row, and which rows made one. When
        tokens are due to be handed on, it returns once they have been."""
        handed = threading.Event() if time.monotonic() - self._handed_on >= self._interval else None
        self._reports.put((np.asarray(tokens), np.asarray(active), handed))
        if handed is not None:
            handed.wait(HAND_ON_WAIT_S)

    def report_done(self, steps: np.ndarray) -> None:
        """The host callback after the loop."""
        self._reports.put(_DONE)

    def run(self, call: Callable[[], T], rows: int, on_tokens: Callable[[TokensByRow], None] | None) -> T:
        """`call()`'s result; while it runs, `on_tokens` gets the tokens of its first `rows` rows generated
        since its last report (at most every RELAY_INTERVAL_S times `rows`). Tokens not yet handed on when the call
        ends are left for the caller to take from the result."""
        while not self._reports.empty():  # left by a call that failed
            self._reports.get()
        pending: TokensByRow = {}
        self._interval = RELAY_INTERVAL_S * rows
        self._handed_on = time.monotonic()
        future = self._caller.submit(call)
        while True:
            try:
                report = self._reports.get(timeout=0.1)
            except queue.Empty:
                if future.done():  # the call failed before its last report
                    break
                continue
            if report is _DONE:
                break
            tokens, active, handed = report
            for row in np.flatnonzero(active[:rows]).tolist():
                pending.setdefault(row, []).append(int(tokens[row]))
            if handed is not None:
                try:
                    if on_tokens is not None and pending:
                        on_tokens(pending)
                        pending = {}
                finally:
                    self._handed_on = time.monotonic()
                    handed.set()
        return future.result()

"""How routes talk to the engine: submit requests, read their chunks merged in arrival order, and abort
whatever a client leaves behind.

Every route and page goes through `EngineClient.chunks`, so a request ends in one of four ways, all
handled here: it finishes (the engine sent its finish reason); the engine fails (`EngineError`); its client
disconnects (a streaming response is cancelled by Starlette, a non-streaming one notices on its next poll
and raises `ClientDisconnected`); or the route stops reading for another reason. In all but the first every
unfinished request is aborted, which frees its slot within one decode chunk.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence

from fastapi import Request
from fastapi.responses import StreamingResponse

from jaxserver.engine.request import GenerationChunk, GenerationRequest, OutputStream
from jaxserver.errors import EngineError, JAXServerError
from jaxserver.server.backend import Backend
from jaxserver.server.metrics import Metrics

# How often a non-streaming request checks whether its client is still there.
DISCONNECT_POLL_S = 0.25


class ClientDisconnected(Exception):
    """The client of a non-streaming request went away; its requests have been aborted."""


class EventStream(StreamingResponse):
    """Server-sent events that abort their requests however the response ends, even when the client left
    before the first byte (then the body iterator never ran, so its own cleanup never did)."""

    def __init__(self, events: AsyncIterator[str], abort: Callable[[], None]):
        super().__init__(events, media_type="text/event-stream")
        self.abort = abort

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.abort()


class EngineClient:
    def __init__(self, backend: Backend, metrics: Metrics):
        self.backend, self.metrics = backend, metrics

    def submit(self, requests: Sequence[GenerationRequest]) -> list[OutputStream]:
        """Submit all of `requests` (so that they batch) or none: when one is refused (overload), the ones
        already submitted are aborted and the error propagates."""
        loop = asyncio.get_running_loop()
        streams: list[OutputStream] = []
        try:
            for request in requests:
                streams.append(self.backend.submit(request, loop))
        except JAXServerError:
            for stream in streams:
                self.backend.abort(stream.request.request_id)
            raise
        self.metrics.prompt_tokens.inc(sum(len(r.prompt_ids) for r in requests))
        return streams

    async def chunks(
        self, streams: Sequence[OutputStream], http: Request | None = None
    ) -> AsyncIterator[tuple[int, GenerationChunk]]:
        """(index into `streams`, chunk) as chunks arrive, until every stream has sent its finish reason.
        With `http` (non-streaming routes only: a streaming response must leave `receive` to Starlette),
        checks every DISCONNECT_POLL_S whether the client is gone and raises `ClientDisconnected`. A chunk
        that says the engine failed raises `EngineError`. Leaving the iteration early in any way aborts the
        unfinished requests."""
        arrived: asyncio.Queue[tuple[int, GenerationChunk]] = asyncio.Queue()

        async def pump(index: int, stream: OutputStream) -> None:
            async for chunk in stream:
                arrived.put_nowait((index, chunk))

        pumps = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        unfinished = set(range(len(streams)))
        last_token_at: list[float | None] = [None] * len(streams)
        checked_at = time.monotonic()
        try:
            while unfinished:
                try:
                    index, chunk = await asyncio.wait_for(arrived.get(), DISCONNECT_POLL_S)
                except TimeoutError:
                    index, chunk = -1, None
                now = time.monotonic()
                if http is not None and now - checked_at >= DISCONNECT_POLL_S:
                    checked_at = now
                    if await http.is_disconnected():
                        raise ClientDisconnected
                if chunk is None:
                    continue
                if chunk.finish_reason == "error":
                    raise EngineError(chunk.error or "the engine failed")
                self.metrics.observe_chunk(chunk, last_token_at[index], streams[index].submitted_at, now)
                if chunk.token_ids:
                    last_token_at[index] = now
                if chunk.finish_reason:
                    unfinished.discard(index)
                yield index, chunk
        finally:
            for task in pumps:
                task.cancel()
            for index in unfinished:
                self.backend.abort(streams[index].request.request_id)

    def event_stream(self, events: AsyncIterator[str], streams: Sequence[OutputStream]) -> EventStream:
        """A streaming response of `events` (read from `streams`) that aborts the requests left unfinished
        (aborting a finished request is a no-op)."""

        def abort() -> None:
            for stream in streams:
                self.backend.abort(stream.request.request_id)

        return EventStream(events, abort)

"""From engine chunks to what a client reads: one whole answer, or server-sent events ending with
`data: [DONE]`. Every generation route goes through `respond`; a route only says, through an `Answer`, how a
chunk and the whole look in its own format.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

from fastapi import Request
from fastapi.responses import Response

from jaxserver.engine.request import GenerationChunk, OutputStream
from jaxserver.errors import EngineError
from jaxserver.server.backend import Backend
from jaxserver.server.request_ids import server_error_message
from jaxserver.server.responses import error_body, sse
from jaxserver.server.streaming import ClientDisconnected, EngineClient


class Answer(Protocol):
    """What a route makes of the chunks of its requests (one per choice)."""

    def add(self, index: int, chunk: GenerationChunk) -> list[dict[str, Any]]:
        """Take choice `index`'s next chunk; return the events it becomes when streamed (maybe none)."""
        ...

    def closing_events(self) -> list[dict[str, Any]]:
        """Events after the last chunk, before `[DONE]` (OpenAI's usage chunk)."""
        ...

    def whole(self) -> Any:
        """The answer once every chunk is in."""
        ...


async def respond(
    backend: Backend,
    client: EngineClient,
    http: Request,
    streams: Sequence[OutputStream],
    answer: Answer,
    stream: bool,
) -> Any:
    """The answer to submitted `streams`: events as they come when `stream`, else the whole answer. An engine
    failure is an error event in a stream and a 500 otherwise; a client gone before the end is 499."""
    if stream:
        return client.event_stream(_events(backend, client, http, streams, answer), streams)
    try:
        async with contextlib.aclosing(client.chunks(streams, http)) as chunks:
            async for index, chunk in chunks:
                answer.add(index, chunk)
    except ClientDisconnected:
        return Response(status_code=499)  # client closed the request; nobody reads this
    backend.count_request()
    return answer.whole()


async def _events(
    backend: Backend, client: EngineClient, http: Request, streams: Sequence[OutputStream], answer: Answer
) -> AsyncIterator[str]:
    try:
        async with contextlib.aclosing(client.chunks(streams)) as chunks:
            async for index, chunk in chunks:
                for event in answer.add(index, chunk):
                    yield sse(event)
    except EngineError as exc:
        yield sse(error_body(server_error_message(exc.message, http), "server_error"))
    else:
        backend.count_request()
        for event in answer.closing_events():
            yield sse(event)
    yield sse("[DONE]")


class SeedAnswer:
    """The seed routes' answer: `{input, response, tokens_used}`; streamed, one event per chunk with the
    new text (`delta`), the text so far and the finish reason."""

    def __init__(self, string: str):
        self.string, self.response, self.tokens_used = string, "", 0

    def add(self, index: int, chunk: GenerationChunk) -> list[dict[str, Any]]:
        self.response += chunk.text
        self.tokens_used = chunk.tokens_generated
        event = {
            "delta": chunk.text,
            "response": self.response,
            "tokens_used": chunk.tokens_generated,
            "finish_reason": chunk.finish_reason,
        }
        return [event]

    def closing_events(self) -> list[dict[str, Any]]:
        return []

    def whole(self) -> dict[str, Any]:
        return {"input": self.string, "response": self.response, "tokens_used": self.tokens_used}

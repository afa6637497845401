"""`Backend`: what the HTTP routes and the web pages need from whatever serves the model.

The server layer depends on this interface only; `jaxserver.JAXServer` provides it and hands itself to
`create_app`. Anything else that provides it (a fake for tests, a client of a remote engine) can be served
by the same app.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from jaxserver.config import JAXServerConfig
from jaxserver.engine.request import GenerationRequest, OutputStream
from jaxserver.model.tokenizer import Tokenizer


class Backend(Protocol):
    config: JAXServerConfig
    model_name: str
    started_at: float  # time.time() of the start, OpenAI's `created` of the model

    def require_ready(self) -> Tokenizer:
        """The model's tokenizer; `NotReadyError` while loading, `EngineError` once the engine failed."""
        ...

    def prepare(
        self, string: str, greedy: bool = False, max_new_tokens: int | None = None, **options: Any
    ) -> GenerationRequest:
        """Tokenize and check a request (options as `JAXServer.prepare` takes them); raises a
        `BadRequestError` for anything that cannot run, before anything is generated."""
        ...

    def tokenize(self, text: str) -> list[int]:
        """The token ids of a prompt; a `ContextLengthError` before the tokenizer reads it when its
        characters alone show that it cannot fit the context."""
        ...

    def submit(
        self, request: GenerationRequest, loop: asyncio.AbstractEventLoop | None = None
    ) -> OutputStream:
        """Hand a prepared request to the engine; its chunks arrive on the stream."""
        ...

    def abort(self, request_id: str) -> None:
        """End a request early; a no-op once it has finished."""
        ...

    def build_instruct_prompt(self, prompt: str, system: str | None = None) -> str: ...

    def build_chat_prompt(
        self, prompt: str, history: Sequence[Sequence[str]] = (), system: str | None = None
    ) -> str: ...

    def build_messages_prompt(self, messages: Sequence[dict[str, str]]) -> str: ...

    def build_tool_prompt(
        self, messages: Sequence[dict[str, Any]], tools: list[dict[str, Any]]
    ) -> str | None:
        """A conversation offering tools rendered by the model's own template, or None where that template
        does not write tool calls."""
        ...

    def custom_forward(self, route: str) -> Callable[[Any], dict[str, Any]] | None:
        """A replacement of the seed's `forward_instruct` or `forward_chat` (`route` "instruct" or "chat")
        that non-streaming requests of that route must go through, or None."""
        ...

    def count_request(self) -> None:
        """One more request answered in full (the seed's served-requests counter)."""
        ...

    def status(self) -> dict[str, Any]: ...

    def engine_stats(self) -> dict[str, Any] | None:
        """The engine's counters (`Engine.stats`), None while no engine runs."""
        ...

    def shutdown(self, drain_timeout_s: float = 30.0) -> None: ...

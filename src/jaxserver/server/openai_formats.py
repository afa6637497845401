"""How the OpenAI routes write their answers: each choice as it grows (`Choice`), as `chat.completion` or
`text_completion` objects whole or as chunks (`ChatFormat`, `TextFormat`), and a body's choices together
(`OpenAIAnswer`), for `answers.respond`."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from jaxserver.engine.request import GenerationChunk, GenerationRequest, TokenLogprobs
from jaxserver.model.tokenizer import Tokenizer
from jaxserver.server.openai_schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatLogprobs,
    ChatTokenLogprob,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    Delta,
    FunctionDelta,
    ToolCall,
    ToolCallDelta,
    TopLogprob,
    Usage,
)
from jaxserver.server.tools import ToolPlan


@dataclass
class Choice:
    """What one choice has produced so far."""

    text: str = ""
    tokens: int = 0
    finish_reason: str | None = None
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    started: bool = False  # a streamed piece has been sent

    def add(self, chunk: GenerationChunk) -> None:
        self.text += chunk.text
        self.tokens = max(self.tokens, chunk.tokens_generated)  # an aborted request's last chunk says 0
        self.finish_reason = chunk.finish_reason
        self.logprobs += chunk.logprobs or []
        self.started = True


class _Format:
    def __init__(self, tokenizer: Tokenizer, logprobs: bool):
        self.tokenizer, self.logprobs = tokenizer, logprobs
        self._texts: dict[int, str] = {}

    def token_text(self, token_id: int) -> str:
        """A token's own text, special tokens included (a piece of a multi-byte character is U+FFFD)."""
        if token_id not in self._texts:
            self._texts[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return self._texts[token_id]


class ChatFormat(_Format):
    """Choices as `chat.completion` (and `chat.completion.chunk`) objects. With `tools`, a finished answer
    is parsed into content or tool calls (`server.tools`), and a streamed one is sent once whole."""

    def __init__(self, tokenizer: Tokenizer, logprobs: bool, tools: ToolPlan | None = None):
        super().__init__(tokenizer, logprobs)
        self.tools = tools

    def whole(self, base: dict[str, Any], choices: list[Choice], usage: Usage) -> ChatCompletion:
        answers = []
        for i, c in enumerate(choices):
            content, calls, reason = self._parsed(c.text, c.finish_reason or "abort")
            message = AssistantMessage(content=content, tool_calls=calls)
            answers.append(
                ChatChoice(
                    index=i, message=message, logprobs=self._logprobs(c.logprobs), finish_reason=reason
                )
            )
        return ChatCompletion(**base, choices=answers, usage=usage)

    def pieces(
        self, base: dict[str, Any], index: int, chunk: GenerationChunk, before: Choice
    ) -> list[ChatCompletionChunk]:
        role = None if before.started else "assistant"
        if self.tools is None:
            return [
                self._chunk(base, index, Delta(role=role, content=chunk.text), chunk.finish_reason, chunk)
            ]
        if chunk.finish_reason is None:
            return [] if before.started else [self._chunk(base, index, Delta(role=role), None)]
        content, calls, reason = self._parsed(before.text + chunk.text, chunk.finish_reason)
        if calls is None:
            return [self._chunk(base, index, Delta(role=role, content=content), reason)]
        events = []
        for k, call in enumerate(calls):  # as OpenAI streams a call: its id and name, then its arguments
            named = ToolCallDelta(
                index=k,
                id=call.id,
                type="function",
                function=FunctionDelta(name=call.function.name, arguments=""),
            )
            events.append(self._chunk(base, index, Delta(role=role, tool_calls=[named]), None))
            arguments = ToolCallDelta(index=k, function=FunctionDelta(arguments=call.function.arguments))
            events.append(self._chunk(base, index, Delta(tool_calls=[arguments]), None))
            role = None
        return [*events, self._chunk(base, index, Delta(), reason)]

    def _chunk(
        self,
        base: dict[str, Any],
        index: int,
        delta: Delta,
        finish_reason: str | None,
        chunk: GenerationChunk | None = None,
    ) -> ChatCompletionChunk:
        logprobs = self._logprobs(chunk.logprobs) if chunk is not None else None
        choice = ChatChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish_reason)
        return ChatCompletionChunk(**base, choices=[choice])

    def _parsed(self, text: str, reason: str) -> tuple[str | None, list[ToolCall] | None, str]:
        """(content, tool calls, finish reason) of an answer; only a finished one can hold calls."""
        if self.tools is None or reason != "stop":
            return text, None, reason
        content, calls = self.tools.parse(text)
        return content, calls, "tool_calls" if calls else reason

    def usage_piece(self, base: dict[str, Any], usage: Usage) -> ChatCompletionChunk:
        return ChatCompletionChunk(**base, choices=[], usage=usage)

    def _logprobs(self, entries: list[TokenLogprobs] | None) -> ChatLogprobs | None:
        if not self.logprobs:
            return None
        text = self.token_text
        return ChatLogprobs(
            content=[
                ChatTokenLogprob(
                    **_top(text(e.token_id), e.logprob),
                    top_logprobs=[TopLogprob(**_top(text(t), lp)) for t, lp in e.top],
                )
                for e in entries or []
            ]
        )


class TextFormat(_Format):
    """Choices as `text_completion` objects (whole or streamed)."""

    def whole(self, base: dict[str, Any], choices: list[Choice], usage: Usage) -> Completion:
        return Completion(
            **base,
            choices=[
                CompletionChoice(
                    index=i,
                    text=c.text,
                    logprobs=self._logprobs(c.logprobs, 0),
                    finish_reason=c.finish_reason or "abort",
                )
                for i, c in enumerate(choices)
            ],
            usage=usage,
        )

    def pieces(
        self, base: dict[str, Any], index: int, chunk: GenerationChunk, before: Choice
    ) -> list[Completion]:
        choice = CompletionChoice(
            index=index,
            text=chunk.text,
            logprobs=self._logprobs(chunk.logprobs or [], len(before.text)),
            finish_reason=chunk.finish_reason,
        )
        return [Completion(**base, choices=[choice])]

    def usage_piece(self, base: dict[str, Any], usage: Usage) -> Completion:
        return Completion(**base, choices=[], usage=usage)

    def _logprobs(self, entries: list[TokenLogprobs], offset: int) -> CompletionLogprobs | None:
        if not self.logprobs:
            return None
        text = self.token_text
        tokens = [text(e.token_id) for e in entries]
        offsets = []
        for token in tokens:
            offsets.append(offset)
            offset += len(token)
        return CompletionLogprobs(
            tokens=tokens,
            token_logprobs=[e.logprob for e in entries],
            top_logprobs=[{text(t): lp for t, lp in e.top} for e in entries],
            text_offset=offsets,
        )


def _top(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


class OpenAIAnswer:
    """The choices of one body as they grow, written by `form` as a whole answer or (`streamed`) as
    chunks."""

    def __init__(
        self,
        model: str,
        kind: str,
        form: ChatFormat | TextFormat,
        requests: list[GenerationRequest],
        n: int,
        streamed: bool,
        include_usage: bool,
    ):
        self.base = {"id": f"{kind}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model}
        self.form, self.include_usage, self.streamed = form, include_usage, streamed
        self.prompt_tokens = sum(len(r.prompt_ids) for r in requests[::n])  # each prompt once
        self.choices = [Choice() for _ in requests]

    def add(self, index: int, chunk: GenerationChunk) -> list[dict[str, Any]]:
        choice = self.choices[index]
        events = []
        if self.streamed and (chunk.text or chunk.finish_reason or chunk.logprobs or not choice.started):
            events = [e.model_dump(mode="json") for e in self.form.pieces(self.base, index, chunk, choice)]
        choice.add(chunk)
        return events

    def usage(self) -> Usage:
        completion = sum(c.tokens for c in self.choices)
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=completion,
            total_tokens=self.prompt_tokens + completion,
        )

    def closing_events(self) -> list[dict[str, Any]]:
        if not self.include_usage:
            return []
        return [self.form.usage_piece(self.base, self.usage()).model_dump(mode="json")]

    def whole(self) -> ChatCompletion | Completion:
        return self.form.whole(self.base, self.choices, self.usage())

"""The OpenAI-compatible routes: `GET /v1/models`, `POST /v1/completions` and `POST /v1/chat/completions`.

A body becomes `n` engine requests per prompt (choice i seeded with seed + i), prepared first (so that a bad
one fails before anything runs) and then submitted together, so that they batch. Their chunks come back
merged through the `EngineClient`, which also aborts them when the client goes away, and `answers.respond`
writes them as one JSON answer or as server-sent events. Chat and completions differ only in how the prompt
is built and how a choice is written: `ChatFormat` and `TextFormat`.
"""

from __future__ import annotations

import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from jaxserver.engine.request import GenerationChunk, GenerationRequest, TokenLogprobs
from jaxserver.errors import BadRequestError, NotFoundError
from jaxserver.model.tokenizer import Tokenizer
from jaxserver.server.answers import respond
from jaxserver.server.backend import Backend
from jaxserver.server.openai_schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatLogprobs,
    ChatTokenLogprob,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    Delta,
    FunctionDelta,
    ModelCard,
    ModelList,
    OpenAISampling,
    ToolCall,
    ToolCallDelta,
    TopLogprob,
    Usage,
)
from jaxserver.server.responses import STREAMED
from jaxserver.server.streaming import EngineClient
from jaxserver.server.structured import body_constraint
from jaxserver.server.tools import ToolPlan, generic_messages, template_messages, tool_plan

INT64 = 2**64


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


def check_model(backend: Backend, name: str | None) -> None:
    if name is not None and name != backend.model_name:
        raise NotFoundError(
            f"the model `{name}` does not exist; this server serves `{backend.model_name}`",
            param="model",
            code="model_not_found",
        )


def _int64(value: int) -> int:
    return (value + INT64 // 2) % INT64 - INT64 // 2


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


def engine_requests(
    backend: Backend,
    body: OpenAISampling,
    prompts: list[list[int]],
    max_tokens: int | None,
    logprobs: int | None,
    max_tokens_field: str = "max_tokens",
    tools: ToolPlan | None = None,
) -> list[GenerationRequest]:
    """n requests per prompt, choice k (counted over all prompts) seeded with seed + k, constrained as the
    body or its `tools` ask. Errors about the engine's max_new_tokens name the body's field instead."""
    config = backend.config
    if body.n > config.max_n:
        raise BadRequestError(f"n is {body.n}; this server allows at most {config.max_n} (max_n)", param="n")
    # One body may take half of what the server holds, so that it never shuts every other client out.
    share = max(1, (config.max_num_seqs + config.max_waiting_requests) // 2)
    if len(prompts) * body.n > share:
        raise BadRequestError(
            f"{len(prompts)} prompt(s) x n={body.n} choices exceed the {share} requests one body may "
            "start at once (half of max_num_seqs + max_waiting_requests)",
            param="n",
        )
    seed = body.seed if body.seed is not None else secrets.randbits(31)
    constraint = body_constraint(body)
    if tools is not None:
        if constraint is not None:
            raise BadRequestError(
                "a request with tools cannot also constrain its answer (the tools' format does)",
                param=constraint.param,
            )
        constraint = tools.constraint()
    try:
        return [
            backend.prepare(
                "",
                body.temperature == 0,
                max_tokens,
                temperature=body.temperature,
                top_p=body.top_p,
                top_k=None if body.top_k is None else max(body.top_k, 0),
                seed=_int64(seed + k),
                stop=body.stop_strings,
                ignore_eos=body.ignore_eos,
                min_p=body.min_p,
                presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty,
                repetition_penalty=body.repetition_penalty,
                logit_bias=tuple((body.logit_bias or {}).items()),
                logprobs=logprobs,
                prompt_ids=ids,
                timeout_s=body.timeout,
                constraint=constraint,
            )
            for k, ids in enumerate(ids for ids in prompts for _ in range(body.n))
        ]
    except BadRequestError as exc:
        if exc.param == "max_new_tokens":
            exc.param = max_tokens_field
            exc.message = exc.message.replace("max_new_tokens", max_tokens_field)
        raise


def completion_prompts(backend: Backend, prompt: Any) -> list[list[int]]:
    """The token ids of a completions prompt: a string, a list of strings, token ids or lists of them."""
    if isinstance(prompt, str):
        prompts = [backend.tokenize(prompt)]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]
    else:
        prompts = [backend.tokenize(p) if isinstance(p, str) else list(p) for p in prompt]
    if not prompts:
        raise BadRequestError("the prompt is empty", param="prompt")
    return prompts


def openai_router(backend: Backend, client: EngineClient) -> APIRouter:
    router = APIRouter(tags=["OpenAI"])

    def model_card() -> ModelCard:
        return ModelCard(
            id=backend.model_name, created=int(backend.started_at), max_model_len=backend.config.max_length
        )

    async def answer(
        http: Request,
        body: OpenAISampling,
        requests: list[GenerationRequest],
        form: ChatFormat | TextFormat,
        kind: str,
    ) -> Any:
        include_usage = bool(body.stream and body.stream_options and body.stream_options.include_usage)
        result = OpenAIAnswer(backend.model_name, kind, form, requests, body.n, body.stream, include_usage)
        streams = client.submit(requests)
        return await respond(backend, client, http, streams, result, body.stream)

    @router.get("/v1/models", response_model=ModelList)
    def list_models() -> ModelList:
        """The one model this server serves."""
        backend.require_ready()
        return ModelList(data=[model_card()])

    @router.get("/v1/models/{model}", response_model=ModelCard)
    def get_model(model: str) -> ModelCard:
        backend.require_ready()
        check_model(backend, model)
        return model_card()

    # Templates, tokenizing and grammars run in a thread (run_in_threadpool): a long prompt or a large
    # schema must not stall every other client on the event loop.

    def prepare_completion(body: CompletionRequest) -> tuple[list[GenerationRequest], TextFormat]:
        tokenizer = backend.require_ready()
        check_model(backend, body.model)
        if body.best_of not in (None, body.n):
            raise BadRequestError("best_of must equal n (or be omitted)", param="best_of")
        prompts = completion_prompts(backend, body.prompt)
        requests = engine_requests(backend, body, prompts, body.max_tokens, body.logprobs)
        return requests, TextFormat(tokenizer, body.logprobs is not None)

    def prepare_chat(body: ChatCompletionRequest) -> tuple[list[GenerationRequest], ChatFormat]:
        tokenizer = backend.require_ready()
        check_model(backend, body.model)
        if body.top_logprobs is not None and not body.logprobs:
            raise BadRequestError("top_logprobs needs logprobs: true", param="top_logprobs")
        tools = tool_plan(body.tools, body.tool_choice, body.parallel_tool_calls)
        string = None
        if tools is not None:
            string = backend.build_tool_prompt(template_messages(body.messages), tools.tool_dicts())
            tools.tagged = string is not None
        if string is None:
            string = backend.build_messages_prompt(generic_messages(body.messages, tools))
        field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        ids = [backend.tokenize(string)]
        requests = engine_requests(backend, body, ids, getattr(body, field), logprobs, field, tools)
        return requests, ChatFormat(tokenizer, body.logprobs, tools)

    @router.post("/v1/completions", response_model=Completion, responses=STREAMED)
    async def completions(body: CompletionRequest, http: Request) -> Any:
        """Continue a prompt (a string, a list of strings, token ids or lists of token ids)."""
        requests, form = await run_in_threadpool(prepare_completion, body)
        return await answer(http, body, requests, form, "cmpl")

    @router.post("/v1/chat/completions", response_model=ChatCompletion, responses=STREAMED)
    async def chat_completions(body: ChatCompletionRequest, http: Request) -> Any:
        """Answer a conversation, rendered with the model's chat template (as /chat does)."""
        requests, form = await run_in_threadpool(prepare_chat, body)
        return await answer(http, body, requests, form, "chatcmpl")

    return router

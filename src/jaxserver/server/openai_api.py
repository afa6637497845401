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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request

from jaxserver.engine.request import GenerationChunk, GenerationRequest, TokenLogprobs
from jaxserver.errors import BadRequestError, NotFoundError
from jaxserver.model.tokenizer import Tokenizer
from jaxserver.server.answers import respond
from jaxserver.server.backend import Backend
from jaxserver.server.responses import STREAMED
from jaxserver.server.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatLogprobs,
    ChatMessage,
    ChatTokenLogprob,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    Delta,
    ModelCard,
    ModelList,
    OpenAISampling,
    TopLogprob,
    Usage,
)
from jaxserver.server.streaming import EngineClient
from jaxserver.server.structured import body_constraint

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
    """Choices as `chat.completion` (and `chat.completion.chunk`) objects."""

    def whole(self, base: dict[str, Any], choices: list[Choice], usage: Usage) -> ChatCompletion:
        return ChatCompletion(
            **base,
            choices=[
                ChatChoice(
                    index=i,
                    message=AssistantMessage(content=c.text),
                    logprobs=self._logprobs(c.logprobs),
                    finish_reason=c.finish_reason or "abort",
                )
                for i, c in enumerate(choices)
            ],
            usage=usage,
        )

    def piece(
        self, base: dict[str, Any], index: int, chunk: GenerationChunk, before: Choice
    ) -> ChatCompletionChunk:
        delta = Delta(role=None if before.started else "assistant", content=chunk.text)
        choice = ChatChunkChoice(
            index=index,
            delta=delta,
            logprobs=self._logprobs(chunk.logprobs),
            finish_reason=chunk.finish_reason,
        )
        return ChatCompletionChunk(**base, choices=[choice])

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

    def piece(self, base: dict[str, Any], index: int, chunk: GenerationChunk, before: Choice) -> Completion:
        choice = CompletionChoice(
            index=index,
            text=chunk.text,
            logprobs=self._logprobs(chunk.logprobs or [], len(before.text)),
            finish_reason=chunk.finish_reason,
        )
        return Completion(**base, choices=[choice])

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


def message_dicts(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    """Messages as the chat template takes them: text content only ("developer" is a system message)."""
    out = []
    for i, message in enumerate(messages):
        content = message.content
        if not isinstance(content, str):
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise BadRequestError(
                        f"messages[{i}].content[{j}] has type {part.type!r}; only text parts are supported",
                        param=f"messages.{i}.content.{j}",
                    )
            content = "\n".join(part.text or "" for part in content)
        out.append({"role": "system" if message.role == "developer" else message.role, "content": content})
    return out


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

    def add(self, index: int, chunk: GenerationChunk) -> dict[str, Any] | None:
        choice = self.choices[index]
        event = None
        if self.streamed and (chunk.text or chunk.finish_reason or chunk.logprobs or not choice.started):
            event = self.form.piece(self.base, index, chunk, choice).model_dump(mode="json")
        choice.add(chunk)
        return event

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
) -> list[GenerationRequest]:
    """n requests per prompt, choice k (counted over all prompts) seeded with seed + k. Errors about the
    engine's max_new_tokens name the body's field instead."""
    capacity = backend.config.max_num_seqs + backend.config.max_waiting_requests
    if len(prompts) * body.n > capacity:
        raise BadRequestError(
            f"{len(prompts)} prompt(s) x n={body.n} choices exceed the {capacity} requests this server "
            "can hold at once",
            param="n",
        )
    seed = body.seed if body.seed is not None else secrets.randbits(31)
    constraint = body_constraint(body)
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


def completion_prompts(tokenizer: Tokenizer, prompt: Any) -> list[list[int]]:
    """The token ids of a completions prompt: a string, a list of strings, token ids or lists of them."""
    if isinstance(prompt, str):
        prompts = [tokenizer.encode(prompt)]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]
    else:
        prompts = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompt]
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

    @router.post("/v1/completions", response_model=Completion, responses=STREAMED)
    async def completions(body: CompletionRequest, http: Request) -> Any:
        """Continue a prompt (a string, a list of strings, token ids or lists of token ids)."""
        tokenizer = backend.require_ready()
        check_model(backend, body.model)
        if body.best_of not in (None, body.n):
            raise BadRequestError("best_of must equal n (or be omitted)", param="best_of")
        prompts = completion_prompts(tokenizer, body.prompt)
        requests = engine_requests(backend, body, prompts, body.max_tokens, body.logprobs)
        return await answer(http, body, requests, TextFormat(tokenizer, body.logprobs is not None), "cmpl")

    @router.post("/v1/chat/completions", response_model=ChatCompletion, responses=STREAMED)
    async def chat_completions(body: ChatCompletionRequest, http: Request) -> Any:
        """Answer a conversation, rendered with the model's chat template (as /chat does)."""
        tokenizer = backend.require_ready()
        check_model(backend, body.model)
        if body.top_logprobs is not None and not body.logprobs:
            raise BadRequestError("top_logprobs needs logprobs: true", param="top_logprobs")
        string = backend.build_messages_prompt(message_dicts(body.messages))
        field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        ids = [tokenizer.encode(string)]
        requests = engine_requests(backend, body, ids, getattr(body, field), logprobs, field)
        return await answer(http, body, requests, ChatFormat(tokenizer, body.logprobs), "chatcmpl")

    return router

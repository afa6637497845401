"""The OpenAI-compatible routes: `GET /v1/models`, `POST /v1/completions` and `POST /v1/chat/completions`.

A body becomes `n` engine requests per prompt (choice i seeded with seed + i), prepared first (so that a bad
one fails before anything runs) and then submitted together, so that they batch. Their chunks come back
merged through the `EngineClient`, which also aborts them when the client goes away, and `answers.respond`
writes them as one JSON answer or as server-sent events. Chat and completions differ only in how the prompt
is built and how a choice is written: `ChatFormat` and `TextFormat` (openai_formats.py).
"""

from __future__ import annotations

import secrets
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from jaxserver.engine.request import GenerationRequest
from jaxserver.errors import BadRequestError, NotFoundError
from jaxserver.server.answers import respond
from jaxserver.server.backend import Backend
from jaxserver.server.openai_formats import ChatFormat, OpenAIAnswer, TextFormat
from jaxserver.server.openai_schemas import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ModelCard,
    ModelList,
    OpenAISampling,
)
from jaxserver.server.responses import STREAMED
from jaxserver.server.streaming import EngineClient
from jaxserver.server.structured import body_constraint
from jaxserver.server.tools import ToolPlan, generic_messages, template_messages, tool_plan

INT64 = 2**64


def check_model(backend: Backend, name: str | None) -> None:
    if name is not None and name != backend.model_name:
        raise NotFoundError(
            f"the model `{name}` does not exist; this server serves `{backend.model_name}`",
            param="model",
            code="model_not_found",
        )


def _int64(value: int) -> int:
    return (value + INT64 // 2) % INT64 - INT64 // 2


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

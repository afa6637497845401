"""The seed's routes: `POST /instruct`, `POST /chat` and `GET /status`.

Both generation routes build their prompt through the backend and check the request before any token is
generated. A backend whose seed `forward_instruct` / `forward_chat` was replaced (a `JAXServer` subclass)
answers non-streaming requests through that replacement, as the seed did.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from jaxserver.engine.request import GenerationRequest
from jaxserver.server.answers import SeedAnswer, respond
from jaxserver.server.backend import Backend
from jaxserver.server.responses import STREAMED
from jaxserver.server.schemas import ChatRequest, GenerationResponse, InstructRequest
from jaxserver.server.streaming import EngineClient


def seed_router(backend: Backend, client: EngineClient) -> APIRouter:
    router = APIRouter(tags=["seed"])

    async def answer(
        route: str, http: Request, data: InstructRequest | ChatRequest, build_prompt: Callable[[], str]
    ) -> Any:
        backend.require_ready()
        custom = backend.custom_forward(route)
        if custom is not None and not data.stream:
            return await run_in_threadpool(custom, data)

        def prepared() -> tuple[str, GenerationRequest]:
            string = build_prompt()
            request = backend.prepare(
                string,
                data.greedy,
                data.max_new_tokens,
                temperature=data.temperature,
                top_p=data.top_p,
                top_k=data.top_k,
                seed=data.seed,
                ignore_eos=data.ignore_eos,
                timeout_s=data.timeout,
            )
            return string, request

        # Templates and tokenizing take a thread: a long prompt must not stall every other client.
        string, request = await run_in_threadpool(prepared)
        streams = client.submit([request])
        return await respond(backend, client, http, streams, SeedAnswer(string), data.stream)

    @router.post("/instruct", response_model=GenerationResponse, responses=STREAMED)
    async def instruct(data: InstructRequest, http: Request) -> Any:
        """Answer one instruction, formatted with the model's chat template or the seed's instruct_format."""
        return await answer(
            "instruct", http, data, lambda: backend.build_instruct_prompt(data.prompt, data.system)
        )

    @router.post("/chat", response_model=GenerationResponse, responses=STREAMED)
    async def chat(data: ChatRequest, http: Request) -> Any:
        """Answer the next turn of a conversation given its history."""
        return await answer(
            "chat",
            http,
            data,
            lambda: backend.build_chat_prompt(data.prompt, data.history or [], data.system),
        )

    @router.get("/status")
    def status() -> dict[str, Any]:
        """Model, devices, uptime, counters and the configuration."""
        return backend.status()

    return router

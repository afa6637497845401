"""vLLM's `POST /tokenize` and `POST /detokenize`: the token ids the generation routes would see."""

from __future__ import annotations

from fastapi import APIRouter

from jaxserver.errors import BadRequestError
from jaxserver.server.backend import Backend
from jaxserver.server.openai_api import check_model
from jaxserver.server.openai_schemas import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from jaxserver.server.tools import generic_messages


def tokenizer_router(backend: Backend) -> APIRouter:
    router = APIRouter(tags=["tokenizer"])

    @router.post("/tokenize", response_model=TokenizeResponse)
    def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        """Token ids of `prompt` (as /v1/completions reads it) or of `messages` (rendered as
        /v1/chat/completions renders them)."""
        tokenizer = backend.require_ready()
        check_model(backend, body.model)
        if (body.prompt is None) == (body.messages is None):
            raise BadRequestError("give exactly one of prompt and messages", param="prompt")
        text = (
            body.prompt
            if body.messages is None
            else backend.build_messages_prompt(generic_messages(body.messages, None))
        )
        ids = tokenizer.encode(text)  # any length: this route counts, it does not run
        return TokenizeResponse(
            count=len(ids),
            max_model_len=backend.config.max_length,
            tokens=ids,
            token_strs=tokenizer.hf.convert_ids_to_tokens(ids) if body.return_token_strs else None,
        )

    @router.post("/detokenize", response_model=DetokenizeResponse)
    def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        """The text of token ids, special tokens included."""
        tokenizer = backend.require_ready()
        check_model(backend, body.model)
        if any(not 0 <= i < tokenizer.vocab_size for i in body.tokens):
            raise BadRequestError(f"token ids must be in [0, {tokenizer.vocab_size})", param="tokens")
        return DetokenizeResponse(prompt=tokenizer.decode(body.tokens, skip_special_tokens=False))

    return router

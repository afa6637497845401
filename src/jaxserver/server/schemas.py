"""Request and response bodies: the seed routes (field names follow the seed; the optional extras are ours),
and every error answer. The OpenAI-compatible and tokenizer routes' are in `openai_schemas`."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

SEED_RANGE = {"ge": -(2**63), "le": 2**63 - 1}  # what a sampling key takes


class _GenerationFields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1)
    system: str | None = None
    temperature: float | None = Field(None, ge=0.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, description="0 disables it; above the vocabulary, the same.")
    seed: int | None = Field(None, **SEED_RANGE)
    greedy: bool = False
    max_new_tokens: int | None = Field(None, ge=1)
    stream: bool = Field(False, description="Answer with server-sent events, one per decoded chunk.")
    ignore_eos: bool = Field(False, description="Generate max_new_tokens tokens even past end-of-sequence.")
    timeout: float | None = Field(
        None,
        gt=0,
        description="Seconds after which the request ends early, waiting or generating, with finish_reason "
        '"abort" and the text so far.',
    )


class InstructRequest(_GenerationFields):
    pass


class ChatRequest(_GenerationFields):
    history: list[tuple[str, str]] | None = Field(
        None, description="Earlier turns as [user message, assistant answer] pairs, oldest first."
    )


class GenerationResponse(BaseModel):
    input: str
    response: str
    tokens_used: int


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """The body of every error answer (`responses.error_body`)."""

    error: ErrorDetail
    status: str | None = Field(None, description='"down" while the model is not ready (the seed\'s answer).')

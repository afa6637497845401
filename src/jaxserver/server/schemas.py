"""Request bodies of the seed routes. Field names follow the seed; the optional extras are ours."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _GenerationFields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1)
    system: str | None = None
    temperature: float | None = Field(None, ge=0.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    seed: int | None = None
    greedy: bool = False
    max_new_tokens: int | None = Field(None, ge=1)
    stream: bool = Field(False, description="Answer with server-sent events, one per decoded chunk.")
    ignore_eos: bool = Field(False, description="Generate max_new_tokens tokens even past end-of-sequence.")


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

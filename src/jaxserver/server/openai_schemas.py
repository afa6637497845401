"""Request and response bodies of the OpenAI-compatible routes and of vLLM's tokenizer routes."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from jaxserver.engine.request import MAX_LOGIT_BIAS, MAX_TOP_LOGPROBS
from jaxserver.errors import BadRequestError
from jaxserver.server.schemas import SEED_RANGE

# --- the OpenAI-compatible routes -----------------------------------------------------------------------
# Field names, ranges and defaults follow OpenAI's API; top_k, min_p, repetition_penalty and ignore_eos are
# vLLM's extensions. A field OpenAI treats as an optional hint (user, metadata, store, ...) is accepted and
# ignored; a feature we lack is accepted only with its neutral value (no tools, text only),
# so that a request relying on it fails with a 400 naming the field instead of being answered wrongly.
# Omitted sampling fields take the server config's defaults.

MAX_CHOICES = 128


def _neutral(name: str, what: str):
    """A validator that lets only an empty / None value of the field `name` through."""

    def check(value):
        if value:
            raise ValueError(f"{what} is not supported by this server")
        return value

    return field_validator(name)(check)


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs`: what the answer must match (one field set)."""

    model_config = ConfigDict(extra="forbid")

    json_: dict[str, Any] | str | None = Field(None, alias="json", description="A JSON schema.")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = Field(None, description="A Lark or GBNF grammar.")
    json_object: bool | None = Field(None, description="Any JSON object.")


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="Omitted: any JSON.")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: text, any JSON object, or JSON matching a schema."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = Field(
        False, description="Send one more chunk, with usage and no choices, before [DONE]."
    )
    include_obfuscation: bool | None = None  # a hint for OpenAI's own transport; ignored


class OpenAISampling(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        None, description="The served model's name (GET /v1/models); omitted: that one."
    )
    max_tokens: int | None = Field(
        None, ge=1, description="Omitted: the server's max_new_tokens, within the context."
    )
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 picks the most likely token.")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, description="0 or -1 disables top-k.")
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    seed: int | None = Field(
        None, **SEED_RANGE, description="Choice i samples with seed + i; omitted: random."
    )
    stop: str | list[str] | None = Field(
        None,
        description="Stop strings (at most max_stop_strings, each of at most max_stop_chars characters); "
        "never in the answer.",
    )
    n: int = Field(
        1, ge=1, le=MAX_CHOICES, description="Choices per prompt, generated as a batch (at most max_n)."
    )
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    timeout: float | None = Field(
        None,
        gt=0,
        description="Seconds after which the request ends early, waiting or generating, with finish_reason "
        '"abort" and the text so far.',
    )
    user: str | None = None
    logit_bias: dict[int, float] | None = Field(
        None,
        description=f"Token id -> a bias in [-100, 100] added to its logit before sampling (at most "
        f"{MAX_LOGIT_BIAS} tokens): -100 bans a token, 100 all but forces it.",
    )

    structured_outputs: StructuredOutputs | None = Field(
        None, description="vLLM's constrained decoding: exactly one of json, regex, choice, grammar."
    )
    guided_json: dict[str, Any] | str | None = Field(
        None, description="vLLM's older structured_outputs.json."
    )
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, value: dict[int, float] | None) -> dict[int, float] | None:
        if value and len(value) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} tokens")
        if value and any(not -100 <= bias <= 100 for bias in value.values()):
            raise ValueError("biases must be in [-100, 100]")
        return value

    @field_validator("stop")
    @classmethod
    def _nonempty_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if value is not None and any(not s for s in ([value] if isinstance(value, str) else value)):
            raise ValueError("stop strings must not be empty")
        return value

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class ContentPart(BaseModel):
    """One part of a message's content; only {"type": "text", "text": ...} can be served."""

    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="The arguments as a JSON object, serialized.")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="A JSON schema of the arguments object.")
    strict: bool | None = None  # arguments always follow `parameters` here


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionName


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None  # a hint; ignored
    refusal: str | None = None  # sent back by clients that echo an earlier answer; ignored
    tool_calls: list[ToolCall] | None = Field(None, description="An assistant message's calls.")
    tool_call_id: str | None = Field(None, description="A tool message's call, which it answers.")

    @model_validator(mode="after")
    def _content_where_needed(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(
                "content is required (it may be null only in an assistant message with tool_calls)"
            )
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        return self

    def text(self, index: int) -> str:
        """The content as text (text parts joined; message `index` is named by errors)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        for j, part in enumerate(self.content):
            if part.type != "text" or part.text is None:
                raise BadRequestError(
                    f"messages[{index}].content[{j}] has type {part.type!r}; only text parts are supported",
                    param=f"messages.{index}.content.{j}",
                )
        return "\n".join(part.text or "" for part in self.content)


class ChatCompletionRequest(OpenAISampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(
        None, ge=1, description="Preferred over max_tokens when both are set."
    )
    logprobs: bool = Field(False, description="Return the log-probability of each generated token.")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="Needs logprobs: true.")
    metadata: dict[str, Any] | None = None  # hints: accepted and ignored
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    parallel_tool_calls: bool | None = None
    modalities: list[Literal["text"]] | None = None
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None


class CompletionRequest(OpenAISampling):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="A string, a list of strings, a list of token ids, or a list of such lists."
    )
    logprobs: int | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS, description="Return the chosen token's and this many top logprobs."
    )
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES, description="Only best_of == n is supported.")
    suffix: str | None = None

    _no_echo = _neutral("echo", "echo")
    _no_suffix = _neutral("suffix", "suffix")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class FunctionDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionDelta


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class Completion(BaseModel):
    """A whole answer, or (streaming, with `usage` None until the last) one chunk of it."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "jaxserver"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --- vLLM's tokenizer routes ----------------------------------------------------------------------------


class TokenizeRequest(BaseModel):
    """Either `prompt` (tokenized as /v1/completions does) or `messages` (rendered and tokenized as
    /v1/chat/completions does)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str

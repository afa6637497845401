"""The server configuration: the seed's 24 fields with their seed defaults, plus a few of our own.

Every setting is defined, defaulted and checked here, once. A bad value raises `pydantic.ValidationError`
whose message names the field and what is allowed.
"""

from __future__ import annotations

import os
import string
from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

DTYPE_ALIASES = {
    "auto": "auto",  # resolved when the model is placed: see JAXServerConfig.dtype
    "fp32": "float32",
    "float32": "float32",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
}


def _placeholders(fmt: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(fmt) if name is not None}


class JAXServerConfig(BaseModel):
    """Settings of a `JAXServer`. Field names and defaults follow the seed, except `dtype` (see below)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    # --- the seed's 24 fields -------------------------------------------------------------------------
    host: str = "0.0.0.0"
    port: int = Field(2059, ge=1, le=65535)
    instruct_format: str = "### SYSTEM:\n{system}\n### INSTRUCT:\n{instruct}\n### ASSISTANT:\n"
    chat_format: str = "<|prompter|>{prompt}</s><|assistant|>{assistant}</s>"
    system_prefix: str = ""
    system: str = ""
    prompt_prefix_instruct: str = ""
    prompt_postfix_instruct: str = ""
    prompt_prefix_chat: str = "<|prompter|>"
    prompt_postfix_chat: str = "</s><|assistant|>"
    chat_prefix: str = ""
    contains_auto_format: bool = True
    max_length: int = Field(2048, ge=2, description="Context size: prompt plus generated tokens.")
    max_new_tokens: int = Field(2048, ge=1)
    max_compile_tokens: int = Field(32, ge=1, le=1024, description="Decode steps per device call.")
    temperature: float = Field(0.1, ge=0.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    top_k: int = Field(50, ge=0, description="0 disables top-k filtering.")
    logging: bool = False
    mesh_axes_names: tuple[str, ...] = ("dp", "fsdp", "mp")
    mesh_axes_shape: tuple[int, ...] = (1, -1, 1)
    # The seed defaults to fp16, which suits GPUs and TPUs; on a CPU float16 matmuls are emulated and
    # slow. "auto", the default here, is bf16 where the machine multiplies bf16 natively (accelerators,
    # and CPUs with AVX512-BF16 through jaxserver's kernel, on a one-device mesh), else fp32.
    dtype: str = "auto"
    seed: int = 556
    use_prefix_tokenizer: bool = True

    # --- ours -------------------------------------------------------------------------------------------
    prompt_format: Literal["auto", "template", "seed"] = Field(
        "auto",
        description=(
            "How /instruct and /chat build prompts. 'template': the model's chat template. 'seed': the "
            "instruct_format/chat_format strings. 'auto': the template when the model has one and the "
            "seed format strings were not set explicitly, else the seed strings."
        ),
    )
    kv_cache_dtype: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto",
        description=(
            "KV cache entries. 'fp16' and 'bf16' halve the cache and speed decoding; they apply where the "
            "paged attention kernel reads the cache (float32 is kept elsewhere). fp16 stays within float32's "
            "predictions (8x finer steps than bf16; range to 65504, llama.cpp's default); bf16 changed "
            "greedy answers of the default model. 'auto': fp16 where the kernel reads the cache, else fp32."
        ),
    )
    quantization: Literal["auto", "none", "int8", "int4"] = Field(
        "auto",
        description=(
            "Matmul weights as low-bit codes, read by the quantized matmul kernel. 'auto': a GGUF's Q4_0, "
            "Q4_1 and Q8_0 weights are served from their codes where the kernel runs (a CPU with AVX2, a "
            "one-device mesh), else dequantized. 'none': always dequantized. 'int8' (per output channel) "
            "and 'int4' (groups of quantization_group inputs) also quantize float weights at load; on a "
            "split mesh or without the kernel they are dequantized inside each step (slower)."
        ),
    )
    quantization_group: int = Field(
        32, ge=32, multiple_of=32, description="Inputs sharing one scale and min under quantization 'int4'."
    )
    enable_prefix_caching: bool = Field(
        True,
        description="Keep full KV cache pages (16 tokens) after their request ends, keyed by their tokens and "
        "every token before them, and give a new request the pages of the longest start of its prompt "
        "they hold (a chat template's system text, an earlier turn): shared, not copied, and only the rest "
        "is computed.",
    )
    max_num_seqs: int = Field(
        64,
        ge=1,
        le=1024,
        validation_alias=AliasChoices("max_num_seqs", "max_batch_size"),
        description="Requests decoded together (max_batch_size is an alias).",
    )
    kv_cache_tokens: int | None = Field(
        None,
        ge=16,
        description="Tokens the paged KV cache holds, shared by every request; at least max_length. None: "
        "1/32 of the machine's memory, at most max_num_seqs x max_length tokens.",
    )
    max_num_batched_tokens: int = Field(
        256,
        ge=8,
        description="Tokens computed in one step: a decode token per running request, the rest pieces of "
        "prompts. More fills the batch sooner (throughput, time to first token) but makes each step, and "
        "so the pause of every running stream, longer.",
    )
    max_waiting_requests: int = Field(
        256, ge=0, description="Requests that may wait to run; beyond it new requests get 503."
    )
    drain_timeout_s: float = Field(
        30.0, ge=0, description="On SIGTERM: how long running requests may finish before they are aborted."
    )
    engine_stall_timeout_s: float = Field(
        60.0,
        gt=0,
        description="An engine with work that has not finished a step for this long is hung: /health "
        "answers 503.",
    )
    max_body_bytes: int = Field(8 * 2**20, ge=1024, description="Larger request bodies get 413.")
    body_timeout_s: float = Field(
        30.0, gt=0, description="A request body not received whole within this time gets 408."
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="A connection whose request line and headers have not all arrived this long after "
        "their first byte (or after it opened) is closed.",
    )
    max_connections: int = Field(
        1024, ge=2, description="Open connections at most; a request beyond them gets 503 from uvicorn."
    )
    max_n: int = Field(
        16, ge=1, le=128, description="Largest `n` (choices per prompt) an OpenAI request may ask for."
    )
    max_stop_strings: int = Field(16, ge=1, description="Stop strings one request may give at most.")
    max_stop_chars: int = Field(256, ge=1, description="Characters one stop string may have at most.")
    api_key: SecretStr | None = Field(
        default_factory=lambda: os.environ.get("JAXSERVER_API_KEY") or None,
        validate_default=True,
        description=(
            "When set, every route but /health needs `Authorization: Bearer <key>`. Defaults to the "
            "environment variable JAXSERVER_API_KEY. Shown as '**********' in /status."
        ),
    )
    cors_origins: tuple[str, ...] = Field(
        (), description="Origins allowed to call the API from a browser (CORS); '*' allows any."
    )
    warm_up: bool = Field(
        True,
        description="Compile the smallest step and the samplers before reporting ready, every other "
        "program on a background thread after (until they are ready, steps take fewer tokens and "
        "decoding goes a step per call).",
    )
    compilation_cache_dir: str | None = Field(
        "~/.cache/jaxserver/xla", description="JAX persistent compilation cache; None turns it off."
    )
    model_cache_dir: str | None = Field(
        "~/.cache/jaxserver/models",
        description="Where a GGUF model's conversion (its float32 weights and tokenizer, as a jaxserver "
        "checkpoint) is kept, so that later starts skip parsing and dequantizing the file; None turns it off.",
    )
    ui: bool = Field(
        True, description="Serve the Gradio pages (/gradio_instruct, /gradio_chat) and a landing page at /."
    )
    # --- several processes (docs/multihost.md) ---
    coordinator_address: str | None = Field(
        default_factory=lambda: os.environ.get("JAXSERVER_COORDINATOR_ADDRESS") or None,
        description="HOST:PORT of process 0 of a group of processes serving one model (default: "
        "$JAXSERVER_COORDINATOR_ADDRESS); process 0 listens there, the others connect.",
    )
    num_processes: int = Field(
        default_factory=lambda: int(os.environ.get("JAXSERVER_NUM_PROCESSES", "1")),
        ge=1,
        description="Processes in the group, the same on each (default: $JAXSERVER_NUM_PROCESSES or 1).",
    )
    process_id: int = Field(
        default_factory=lambda: int(os.environ.get("JAXSERVER_PROCESS_ID", "0")),
        ge=0,
        description="This process's index in the group; 0 serves the API, the others only /health "
        "(default: $JAXSERVER_PROCESS_ID or 0).",
    )
    distributed_timeout_s: float = Field(
        120.0, gt=0, description="How long the processes wait for each other to form the group."
    )
    heartbeat_timeout_s: float = Field(
        10.0,
        gt=0,
        description="A process of the group not heard from for this long has failed: every process ends "
        "its requests with an error and exits non-zero.",
    )

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        if value.lower() not in DTYPE_ALIASES:
            raise ValueError(f"dtype must be one of {sorted(DTYPE_ALIASES)}, got {value!r}")
        return value.lower()

    @field_validator("instruct_format")
    @classmethod
    def _instruct_placeholders(cls, value: str) -> str:
        unknown = _placeholders(value) - {"instruct", "system"}
        if "instruct" not in _placeholders(value) or unknown:
            raise ValueError(
                "instruct_format must contain {instruct} and may contain only {instruct} and {system}"
            )
        return value

    @field_validator("chat_format")
    @classmethod
    def _chat_placeholders(cls, value: str) -> str:
        if _placeholders(value) != {"prompt", "assistant"}:
            raise ValueError("chat_format must contain exactly the placeholders {prompt} and {assistant}")
        return value

    @model_validator(mode="after")
    def _check_mesh_and_lengths(self) -> JAXServerConfig:
        if len(self.mesh_axes_names) != len(self.mesh_axes_shape):
            raise ValueError(
                f"mesh_axes_names {self.mesh_axes_names} and mesh_axes_shape {self.mesh_axes_shape} "
                "must have the same length"
            )
        if len(set(self.mesh_axes_names)) != len(self.mesh_axes_names):
            raise ValueError(f"mesh_axes_names must be distinct, got {self.mesh_axes_names}")
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < self.max_length:
            raise ValueError(
                f"kv_cache_tokens ({self.kv_cache_tokens}) must hold at least one request of max_length "
                f"({self.max_length}) tokens"
            )
        if any(s == 0 or s < -1 for s in self.mesh_axes_shape) or list(self.mesh_axes_shape).count(-1) > 1:
            raise ValueError(
                f"mesh_axes_shape entries must be positive, with at most one -1, got {self.mesh_axes_shape}"
            )
        if self.num_processes > 1:
            host, _, port = (self.coordinator_address or "").rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(
                    f"coordinator_address must be HOST:PORT of process 0 when num_processes is "
                    f"{self.num_processes}, got {self.coordinator_address!r}"
                )
        if self.process_id >= self.num_processes:
            raise ValueError(f"process_id {self.process_id} must be below num_processes {self.num_processes}")
        return self

    @property
    def jax_dtype_name(self) -> str:
        return DTYPE_ALIASES[self.dtype]

    def uses_seed_formats(self, model_has_template: bool) -> bool:
        """True when prompts are built from the seed's format strings rather than the chat template."""
        if self.prompt_format != "auto":
            return self.prompt_format == "seed"
        set_by_user = self.model_fields_set & {"instruct_format", "chat_format"}
        return not model_has_template or bool(set_by_user)

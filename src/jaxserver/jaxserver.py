"""`JAXServer`: the seed-compatible facade over model loading, the engine and the HTTP app.

Life of a server: `JAXServer(config)` -> `load(...)` or `load_from_params(...)` reads the model ->
`shard_params` places it on the device mesh -> `configure_generate_functions` builds the runner and
starts the engine (and compiles common shapes) -> `process` / `forward_*` / HTTP routes generate -> `fire()` serves.
A server may answer HTTP before its model is ready: generation routes then answer 503.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jaxserver.config import JAXServerConfig
from jaxserver.engine.engine import Engine
from jaxserver.engine.request import GenerationChunk, GenerationRequest, OutputStream, SamplingOptions
from jaxserver.engine.runner import Runner, kernel_fits, prompt_buckets
from jaxserver.errors import BadRequestError, ContextLengthError, EngineError, ModelLoadError, NotReadyError
from jaxserver.model import checkpoint, cpu_kernels
from jaxserver.model.config import ModelConfig
from jaxserver.model.llama import Params, cast_params
from jaxserver.model.loader import load_model
from jaxserver.model.tokenizer import Tokenizer
from jaxserver.parallel.mesh import cache_sharding, make_mesh, shard_params

log = logging.getLogger(__name__)

# The config's 16-bit kv_cache_dtype names -> cache entry dtypes.
KV_CACHE_DTYPES = {"fp16": jnp.float16, "bf16": jnp.bfloat16}


def _as_tokenizer(tokenizer: Any, cfg: ModelConfig) -> Tokenizer:
    return (
        tokenizer
        if isinstance(tokenizer, Tokenizer)
        else Tokenizer(tokenizer, extra_eos_ids=cfg.eos_token_ids)
    )


def _model_config(model: ModelConfig | None, config_model: ModelConfig | None) -> ModelConfig | None:
    if model is not None and config_model is not None and model != config_model:
        raise ModelLoadError("`model` and `config_model` describe different models; pass one of them")
    for candidate in (model, config_model):
        if candidate is not None and not isinstance(candidate, ModelConfig):
            raise ModelLoadError(
                f"expected a jaxserver.ModelConfig for `model`/`config_model`, got {type(candidate).__name__}"
            )
    return model or config_model


class JAXServer:
    def __init__(self, config: JAXServerConfig | dict[str, Any] | None = None):
        self.config = config if isinstance(config, JAXServerConfig) else JAXServerConfig(**(config or {}))
        logging.getLogger("jaxserver").setLevel(logging.INFO if self.config.logging else logging.WARNING)
        self.model_config: ModelConfig | None = None
        self.params: Params | None = None
        self.tokenizer: Tokenizer | None = None
        self.model_name = "unloaded"
        self.mesh: jax.sharding.Mesh | None = None
        self.engine: Engine | None = None
        self._funcs_generated = False
        self.started_at = time.time()
        self.number_of_served_request_until_last_up_time = 0
        self.load_error: str | None = None
        self._counter_lock = threading.Lock()
        self._app = None

    # --- loading ----------------------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        path: str | os.PathLike | None = None,
        model: ModelConfig | None = None,
        tokenizer: Any = None,
        config_model: ModelConfig | None = None,
        add_params_field: bool = True,
        config: JAXServerConfig | dict[str, Any] | None = None,
        init_shape: Sequence[int] = (1, 1),
    ) -> JAXServer:
        """Load `path` (a .gguf file, a Hugging Face folder or a jaxserver checkpoint; None: the default
        SmolLM2-135M-Instruct) and make it ready to generate. `tokenizer` overrides the model's own.
        `add_params_field` and `init_shape` are accepted for seed compatibility; they have no effect."""
        server = cls(config)
        server.load_model(path, tokenizer=tokenizer, expected=_model_config(model, config_model))
        return server

    @classmethod
    def load_from_params(
        cls,
        model: ModelConfig | None = None,
        params: Params | None = None,
        tokenizer: Any = None,
        config_model: ModelConfig | None = None,
        add_params_field: bool = True,
        config: JAXServerConfig | dict[str, Any] | None = None,
    ) -> JAXServer:
        """Serve `params` (our pytree layout, see `jaxserver.model.llama`) for the model described by
        `config_model` (or `model`), with `tokenizer` (ours or a transformers tokenizer)."""
        cfg = _model_config(model, config_model)
        if cfg is None or params is None or tokenizer is None:
            raise ModelLoadError(
                "load_from_params needs params, a tokenizer and a ModelConfig (config_model)"
            )
        if "params" in params and add_params_field:
            params = params["params"]
        server = cls(config)
        server._attach(cfg, params, _as_tokenizer(tokenizer, cfg), name=cfg.architecture)
        return server

    def load_model(
        self, path: str | os.PathLike | None, tokenizer: Any = None, expected: ModelConfig | None = None
    ):
        """Read the model at `path`, place it on the mesh and compile. Records the error for /status."""
        try:
            cfg, params, own_tokenizer = load_model(path, self.weight_dtype)
            if expected is not None and expected != cfg:
                raise ModelLoadError(f"the model at {path} does not match the given config_model")
            name = Path(path).name if path else "SmolLM2-135M-Instruct"
            self._attach(
                cfg, params, _as_tokenizer(tokenizer, cfg) if tokenizer else own_tokenizer, name=name
            )
        except Exception as exc:
            self.load_error = str(exc)
            raise

    def _attach(self, cfg: ModelConfig, params: Params, tokenizer: Tokenizer, name: str) -> None:
        self.model_config, self.tokenizer, self.model_name = cfg, tokenizer, name
        self.params = self.shard_params(cast_params(params, jnp.dtype(self.weight_dtype)))
        self.configure_generate_functions(cfg, tokenizer)

    @property
    def weight_dtype(self) -> str:
        """The weights' dtype: the config's, with "auto" resolved for this machine. On a CPU, bf16 pays
        through jaxserver's matmul kernel, which needs each weight whole on one device: "auto" picks it
        only for a one-device mesh."""
        name = self.config.jax_dtype_name
        if name != "auto":
            return name
        if jax.default_backend() != "cpu":
            return "bfloat16"
        shape = self.config.mesh_axes_shape
        devices = math.prod(jax.device_count() if size == -1 else size for size in shape)
        return "bfloat16" if devices == 1 and cpu_kernels.bf16_gemm_available() else "float32"

    def shard_params(self, params: Params) -> Params:
        """Place params on the mesh built from `mesh_axes_names` / `mesh_axes_shape`."""
        self.mesh = make_mesh(self.config.mesh_axes_names, self.config.mesh_axes_shape)
        return shard_params(params, self.mesh)

    def kv_cache_dtype(self, model: ModelConfig, sharding: jax.sharding.Sharding) -> jnp.dtype:
        """The KV cache's entry dtype: the config's, with "auto" resolved. A 16-bit cache only where the
        decode attention kernel reads it: XLA's attention over a bfloat16 one took a 32-row step to 236 ms
        from 81 (decode_step.py)."""
        wanted = self.config.kv_cache_dtype
        if wanted == "fp32":
            return jnp.dtype(jnp.float32)
        dtype = jnp.dtype(KV_CACHE_DTYPES["fp16" if wanted == "auto" else wanted])
        if kernel_fits(model, dtype, sharding):
            return dtype
        if wanted != "auto":
            log.warning(
                "kv_cache_dtype %s needs the decode attention kernel (one device's whole cache, supported "
                "heads, a C++ compiler); the KV cache stays float32",
                wanted,
            )
        return jnp.dtype(jnp.float32)

    def configure_generate_functions(self, model: ModelConfig, tokenizer: Tokenizer) -> None:
        """Build the runner (compiled prefill and decode over the KV cache) and start the engine that
        batches all requests. An override must set `self.engine` (started) and `self._funcs_generated`."""
        cfg = self.config
        if cfg.compilation_cache_dir:
            jax.config.update("jax_compilation_cache_dir", os.path.expanduser(cfg.compilation_cache_dir))
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
        assert self.params is not None and self.mesh is not None, "call shard_params first"
        slots = cfg.max_batch_size
        cache_shape = (slots, model.num_kv_heads, cfg.max_length, model.head_dim)
        sharding = cache_sharding(cache_shape, self.mesh)
        cache_dtype = self.kv_cache_dtype(model, sharding)
        runner = Runner(
            model,
            self.params,
            slots=slots,
            cache_len=cfg.max_length,
            steps_per_call=cfg.max_compile_tokens,
            eos_ids=tokenizer.eos_token_ids,
            cache_dtype=cache_dtype,
            cache_sharding=sharding,
        )
        log.info(
            "KV cache: %.1f MiB for %d slots x %d tokens (%s)",
            runner.cache_bytes / 2**20,
            slots,
            cfg.max_length,
            cache_dtype.name,
        )
        later_shapes = []
        if cfg.warm_up:
            started = time.perf_counter()
            later_shapes = runner.warm_up(prompt_buckets(min(cfg.prefill_chunk_tokens, cfg.max_length)))
            log.info("warmed up in %.1f s", time.perf_counter() - started)
        if self.engine is not None:
            self.engine.shutdown(drain_timeout_s=0)
        self.engine = Engine(
            runner,
            tokenizer,
            max_waiting=cfg.max_waiting_requests,
            prefill_chunk_tokens=cfg.prefill_chunk_tokens,
            prefill_budget_tokens=cfg.prefill_budget_tokens,
            left_pad=cfg.use_prefix_tokenizer,
            reuse_prefixes=cfg.enable_prefix_caching,
        )
        self.engine.start()
        if later_shapes:
            threading.Thread(
                target=compile_ahead, args=(runner, later_shapes), name="jaxserver-compile-ahead", daemon=True
            ).start()
        self._funcs_generated = True

    @property
    def ready(self) -> bool:
        return self._funcs_generated and self.engine is not None and self.engine.alive

    def shutdown(self, drain_timeout_s: float = 30.0) -> None:
        """Stop admitting requests, let running ones finish (up to the timeout), abort the rest."""
        if self.engine is not None:
            self.engine.shutdown(drain_timeout_s)

    def save(self, path: str | os.PathLike) -> None:
        """Write a jaxserver checkpoint that `JAXServer.load(path=...)` reads back."""
        if self.params is None or self.model_config is None or self.tokenizer is None:
            raise NotReadyError("no model is loaded")
        checkpoint.save_checkpoint(Path(path), self.model_config, self.params, self.tokenizer)

    # --- generation -------------------------------------------------------------------------------------

    def require_ready(self) -> tuple[Engine, Tokenizer]:
        if not self.ready or self.tokenizer is None or self.engine is None:
            if self.engine is not None and self.engine.error:
                raise EngineError(f"the engine has stopped after an error: {self.engine.error}")
            raise NotReadyError(self.load_error or "the model is still loading")
        return self.engine, self.tokenizer

    def prepare(
        self,
        string: str,
        greedy: bool = False,
        max_new_tokens: int | None = None,
        *,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: Sequence[str] = (),
        ignore_eos: bool = False,
        min_p: float = 0.0,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        repetition_penalty: float = 1.0,
        logprobs: int | None = None,
        prompt_ids: list[int] | None = None,
        timeout_s: float | None = None,
    ) -> GenerationRequest:
        """Tokenize and check a request; raises a `BadRequestError` for anything that cannot run.
        `prompt_ids` (already tokenized) replaces `string` when given; `timeout_s` ends the request
        that many seconds after it is submitted."""
        engine, tokenizer = self.require_ready()
        ids = list(prompt_ids) if prompt_ids is not None else tokenizer.encode(string)
        if any(not 0 <= i < tokenizer.vocab_size for i in ids):
            raise BadRequestError(f"token ids must be in [0, {tokenizer.vocab_size})", param="prompt")
        if not ids:
            raise BadRequestError("the prompt is empty", param="prompt")
        engine.check_fits(len(ids))
        room = self.config.max_length - len(ids)
        if max_new_tokens is not None and max_new_tokens < 1:
            raise BadRequestError("max_new_tokens must be >= 1", param="max_new_tokens")
        if max_new_tokens is not None and max_new_tokens > room:
            raise ContextLengthError(
                f"the prompt has {len(ids)} tokens and max_new_tokens is {max_new_tokens}, together over the "
                f"context (max_length) of {self.config.max_length}; ask for at most {room} new tokens",
                param="max_new_tokens",
            )
        cfg = self.config
        sampling = SamplingOptions(
            temperature=cfg.temperature if temperature is None else temperature,
            top_p=cfg.top_p if top_p is None else top_p,
            top_k=cfg.top_k if top_k is None else min(top_k, tokenizer.vocab_size),  # more: all, as 0
            greedy=greedy,
            seed=cfg.seed if seed is None else seed,
            min_p=min_p,
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
            repetition_penalty=repetition_penalty,
        )
        budget = min(max_new_tokens or cfg.max_new_tokens, room)
        return GenerationRequest(
            prompt_ids=ids,
            max_new_tokens=budget,
            sampling=sampling,
            stop=tuple(stop),
            ignore_eos=ignore_eos,
            logprobs=logprobs,
            timeout_s=timeout_s,
        )

    def submit(
        self, request: GenerationRequest, loop: asyncio.AbstractEventLoop | None = None
    ) -> OutputStream:
        """Hand a prepared request to the engine; read its chunks from the returned stream."""
        engine, _ = self.require_ready()
        return engine.submit(request, loop)

    def abort(self, request_id: str) -> None:
        if self.engine is not None:
            self.engine.abort(request_id)

    def stream(self, request: GenerationRequest) -> Iterator[GenerationChunk]:
        """Chunks of one request; stopping the iteration early cancels the request."""
        chunks = self.submit(request)
        finished = False
        try:
            for chunk in chunks:
                if chunk.finish_reason == "error":
                    raise EngineError(chunk.error or "the engine failed")
                finished = chunk.finish_reason is not None
                yield chunk
        finally:
            if not finished:
                self.abort(request.request_id)

    def process(
        self, string: str, greedy: bool = False, max_new_tokens: int | None = None, **sampling: Any
    ) -> Iterator[tuple[str, int]]:
        """Generate from the raw `string`, yielding (response so far, tokens generated) after each chunk."""
        response = ""
        for chunk in self.stream(self.prepare(string, greedy, max_new_tokens, **sampling)):
            response += chunk.text
            yield response, chunk.tokens_generated

    def count_request(self) -> None:
        with self._counter_lock:
            self.number_of_served_request_until_last_up_time += 1

    # --- prompts ----------------------------------------------------------------------------------------

    @property
    def uses_seed_formats(self) -> bool:
        return self.config.uses_seed_formats(bool(self.tokenizer and self.tokenizer.has_chat_template))

    def build_instruct_prompt(self, prompt: str, system: str | None = None) -> str:
        cfg = self.config
        system = cfg.system if system is None else system
        if not cfg.contains_auto_format:
            return prompt
        if self.uses_seed_formats:
            instruct = cfg.prompt_prefix_instruct + prompt + cfg.prompt_postfix_instruct
            return cfg.instruct_format.format(instruct=instruct, system=cfg.system_prefix + system)
        return self._template([], prompt, system)

    def process_chat_history(self, history: Sequence[Sequence[str]]) -> str:
        """The seed's chat history rendering: one `chat_format` per (prompt, answer) pair."""
        return "".join(self.config.chat_format.format(prompt=user, assistant=bot) for user, bot in history)

    def build_chat_prompt(
        self, prompt: str, history: Sequence[Sequence[str]] = (), system: str | None = None
    ) -> str:
        cfg = self.config
        system = cfg.system if system is None else system
        if self.uses_seed_formats or not cfg.contains_auto_format:
            head = cfg.chat_prefix + (cfg.system_prefix + system if system else "")
            return (
                head
                + self.process_chat_history(history)
                + cfg.prompt_prefix_chat
                + prompt
                + cfg.prompt_postfix_chat
            )
        return self._template(history, prompt, system)

    def _seed_chat_prompt(self, messages: Sequence[dict[str, str]]) -> str:
        """`messages` in the seed's chat format: system turns joined, then (user, assistant) pairs."""
        system = "\n".join(m["content"] for m in messages if m["role"] == "system") or None
        turns = [m for m in messages if m["role"] != "system"]
        if not turns or turns[-1]["role"] != "user":
            raise BadRequestError("the conversation must end with a user message", param="messages")
        history, pending_user = [], None
        for message in turns[:-1]:
            if message["role"] == "user":
                if pending_user is not None:
                    history.append((pending_user, ""))
                pending_user = message["content"]
            else:
                history.append((pending_user or "", message["content"]))
                pending_user = None
        if pending_user is not None:
            history.append((pending_user, ""))
        return self.build_chat_prompt(turns[-1]["content"], history, system)

    def _template(self, history: Sequence[Sequence[str]], prompt: str, system: str) -> str:
        messages = [{"role": "system", "content": system}] if system else []
        for user, assistant in history:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        messages.append({"role": "user", "content": prompt})
        return self.build_messages_prompt(messages)

    def build_messages_prompt(self, messages: Sequence[dict[str, str]]) -> str:
        """The prompt for an OpenAI-style conversation ([{"role", "content"}], ending with a user turn):
        the model's chat template, or the seed's chat format when the model has none (or the config
        asks for it), so that `/chat` and `/v1/chat/completions` build the same prompt."""
        _, tokenizer = self.require_ready()
        if self.uses_seed_formats or not self.config.contains_auto_format:
            return self._seed_chat_prompt(messages)
        try:
            return tokenizer.apply_chat_template(messages)
        except Exception as exc:  # jinja raises its own types, including the template's raise_exception
            raise BadRequestError(f"the model's chat template rejected the conversation: {exc}") from exc

    # --- the seed's forward functions --------------------------------------------------------------------

    def _complete(
        self, string: str, greedy: bool, max_new_tokens: int | None, **sampling: Any
    ) -> dict[str, Any]:
        response, used = "", 0
        for response, used in self.process(string, greedy, max_new_tokens, **sampling):
            pass
        self.count_request()
        return {"input": string, "response": response, "tokens_used": used}

    def forward_instruct(self, data: Any) -> dict[str, Any]:
        """Answer an `InstructRequest` (prompt, system, temperature, greedy, max_new_tokens)."""
        if not self.ready:
            return {"status": "down"}
        string = self.build_instruct_prompt(data.prompt, data.system)
        return self._complete(string, data.greedy, data.max_new_tokens, **_sampling_fields(data))

    def forward_chat(self, data: Any) -> dict[str, Any]:
        """Answer a `ChatRequest` (prompt, history, system, temperature, greedy, max_new_tokens)."""
        if not self.ready:
            return {"status": "down"}
        string = self.build_chat_prompt(data.prompt, data.history or [], data.system)
        return self._complete(string, data.greedy, data.max_new_tokens, **_sampling_fields(data))

    def forward_instruct_non_api(
        self, prompt: str, system: str | None = None, greedy: bool = False
    ) -> dict[str, Any]:
        return self._complete(self.build_instruct_prompt(prompt, system), greedy, None)

    def forward_chat_non_api(
        self,
        prompt: str,
        history: Sequence[Sequence[str]] = (),
        greedy: bool = False,
        system: str | None = None,
    ) -> dict[str, Any]:
        return self._complete(self.build_chat_prompt(prompt, history, system), greedy, None)

    # --- status and serving -----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        cfg = self.model_config
        return {
            "status": "ready" if self.ready else ("failed" if self.load_error else "loading"),
            "error": self.load_error,
            "model": self.model_name,
            "architecture": cfg.architecture if cfg else None,
            "parameters": cfg.parameter_count if cfg else None,
            "dtype": self.weight_dtype,
            "devices": [str(d) for d in jax.devices()],
            "mesh": dict(self.mesh.shape) if self.mesh else None,
            "prompt_format": ("seed" if self.uses_seed_formats else "template") if self.tokenizer else None,
            "uptime_s": round(time.time() - self.started_at, 1),
            "requests_served": self.number_of_served_request_until_last_up_time,
            "tokens_generated": self.engine.tokens_generated if self.engine else 0,
            "engine": self.engine.stats() if self.engine else None,
            "config": self.config.model_dump(mode="json"),
        }

    @property
    def app(self):
        """The FastAPI application (built once)."""
        if self._app is None:
            from jaxserver.server.app import create_app

            self._app = create_app(self)
        return self._app

    def fire(self) -> None:
        """Serve the HTTP API with uvicorn on config.host:config.port (blocks)."""
        import uvicorn

        uvicorn.run(self.app, host=self.config.host, port=self.config.port, log_level="info")


def _sampling_fields(data: Any) -> dict[str, Any]:
    return {name: getattr(data, name, None) for name in ("temperature", "top_p", "top_k", "seed")}


def compile_ahead(runner: Runner, shapes: list[tuple[int, int]]) -> None:
    """Compile the rarer decode shapes while the server already serves; a failure here costs only a
    compilation at first use, so it is logged, not raised."""
    try:
        runner.compile_ahead(shapes)
    except Exception:
        log.warning("compiling decode shapes ahead failed", exc_info=True)

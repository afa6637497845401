"""`JAXServer`: the seed-compatible facade over model loading, the engine and the HTTP app.

Life of a server: `JAXServer(config)` -> `load(...)` or `load_from_params(...)` reads the model ->
`shard_params` places it on the device mesh -> `configure_generate_functions` starts the engine
(`engine.setup`) -> `process` / `forward_*` / HTTP routes generate -> `fire()` serves. A server may answer
HTTP before its model is ready: generation routes then answer 503. `JAXServer` is the `Backend` that the
app (`server.app.create_app`) serves; prompts are built by `prompts.PromptBuilder`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax

from jaxserver.config import JAXServerConfig
from jaxserver.engine import setup
from jaxserver.engine.engine import ENGINE_FAILED, Engine
from jaxserver.engine.request import GenerationChunk, GenerationRequest, OutputStream, new_request
from jaxserver.errors import ContextLengthError, EngineError, ModelLoadError, NotReadyError
from jaxserver.model import checkpoint, cpu_kernels, quant
from jaxserver.model.config import ModelConfig
from jaxserver.model.llama import Params
from jaxserver.model.loader import load_model
from jaxserver.model.tokenizer import Tokenizer
from jaxserver.parallel.group import StepChannel
from jaxserver.parallel.mesh import make_mesh, shard_params
from jaxserver.prompts import PromptBuilder, seed_history

if TYPE_CHECKING:
    from fastapi import FastAPI

log = logging.getLogger(__name__)


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
        self._params: Params | None = None
        self.weights: dict[str, Any] | None = None  # resident bytes and code bits (`quant.weights_summary`)
        self.tokenizer: Tokenizer | None = None
        self.model_name = "unloaded"
        self.mesh: jax.sharding.Mesh | None = None
        self._engine: Engine | None = None
        self._funcs_generated = False
        self.started_at = time.time()
        self.number_of_served_request_until_last_up_time = 0
        self.load_error: str | None = None  # why the model did not load (for the log, not for clients)
        # Called once with the reason when the engine fails (`jaxserver serve` exits non-zero then).
        self.on_engine_failure: Callable[[str], None] | None = None
        self._counter_lock = threading.Lock()
        self._app = None
        # Process 0 of a group of processes (`jaxserver.leader`): where every device call is announced.
        self.channel: StepChannel | None = None

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
        server._attach(cfg, params, Tokenizer.wrap(tokenizer, cfg.eos_token_ids), name=cfg.architecture)
        return server

    def load_model(
        self, path: str | os.PathLike | None, tokenizer: Any = None, expected: ModelConfig | None = None
    ):
        """Read the model at `path`, place it on the mesh and compile. Records the error for /status."""
        # The kernels build (tens of seconds, once per machine) while the file loads: "auto" weights wait
        # for them to pick bf16 or float32, but either is read as float32 first.
        threading.Thread(target=cpu_kernels.available, name="jaxserver-kernels", daemon=True).start()
        try:
            cfg, params, own_tokenizer = load_model(
                path,
                setup.host_dtype(self.config),
                self.config.model_cache_dir,
                keep_codes=self.config.quantization != "none",
            )
            if expected is not None and expected != cfg:
                raise ModelLoadError(f"the model at {path} does not match the given config_model")
            name = Path(path).name if path else "SmolLM2-135M-Instruct"
            self._attach(
                cfg,
                params,
                Tokenizer.wrap(tokenizer, cfg.eos_token_ids) if tokenizer else own_tokenizer,
                name=name,
            )
        except Exception as exc:
            self.load_error = str(exc)
            raise

    def _attach(self, cfg: ModelConfig, params: Params, tokenizer: Tokenizer, name: str) -> None:
        self.model_config, self.tokenizer, self.model_name = cfg, tokenizer, name
        self.params = self.shard_params(setup.serving_params(self.config, params, self.weight_dtype))
        self.weights = quant.weights_summary(self.params)
        self.configure_generate_functions(cfg, tokenizer)

    @property
    def params(self) -> Params | None:
        """The model's parameters, placed on the mesh. Once the engine serves, its per-layer weights are the
        only copy (the stacked ones would double the model's memory), and each read rebuilds the stacked
        layout from them."""
        if self._params is None and self.engine is not None and self.mesh is not None:
            return shard_params(self.engine.runner.model_params(), self.mesh)
        return self._params

    @params.setter
    def params(self, params: Params | None) -> None:
        self._params = params

    @property
    def weight_dtype(self) -> str:
        """The weights' dtype: the config's, with "auto" resolved for this machine (`setup.weight_dtype`)."""
        return setup.weight_dtype(self.config)

    def shard_params(self, params: Params) -> Params:
        """Place params on the mesh built from `mesh_axes_names` / `mesh_axes_shape`."""
        self.mesh = make_mesh(self.config.mesh_axes_names, self.config.mesh_axes_shape)
        return shard_params(params, self.mesh)

    def configure_generate_functions(self, model: ModelConfig, tokenizer: Tokenizer) -> None:
        """Build the runner (compiled prefill and decode over the KV cache) and start the engine that
        batches all requests. An override must set `self.engine` (started) and `self._funcs_generated`."""
        assert self.params is not None and self.mesh is not None, "call shard_params first"
        engine = setup.start_engine(self.config, model, self.params, tokenizer, self.mesh, self.channel)
        if self.engine is not None:  # the old one served while the new one compiled
            self.engine.shutdown(drain_timeout_s=0)
        self.engine, self._params = engine, None
        self._funcs_generated = True

    @property
    def engine(self) -> Engine | None:
        """The engine serving every request (set by `configure_generate_functions`, or an override)."""
        return self._engine

    @engine.setter
    def engine(self, engine: Engine | None) -> None:
        if engine is not None:
            engine.on_failure = self._engine_failed
        self._engine = engine

    def _engine_failed(self, reason: str) -> None:
        if self.on_engine_failure is not None:
            self.on_engine_failure(reason)

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

    def _running(self) -> tuple[Engine, Tokenizer]:
        """The engine and tokenizer; `NotReadyError` while loading or while the engine hangs, `EngineError`
        once it failed. Their messages are for clients: the reasons are in the log."""
        if not self.ready or self.tokenizer is None or self.engine is None:
            if self.engine is not None and self.engine.error:
                raise EngineError(ENGINE_FAILED)
            if self.load_error:
                raise NotReadyError("the model could not be loaded; the server log says why")
            raise NotReadyError("the model is still loading")
        if not self.engine.accepting:
            raise NotReadyError("the server is shutting down")
        stalled_s = self.engine.stalled_for()
        if stalled_s is not None:
            raise NotReadyError(f"the engine has not finished a step for {stalled_s:.0f} s")
        return self.engine, self.tokenizer

    def require_ready(self) -> Tokenizer:
        """The tokenizer, once the server can generate (else `NotReadyError` or `EngineError`)."""
        return self._running()[1]

    def prepare(
        self,
        string: str,
        greedy: bool = False,
        max_new_tokens: int | None = None,
        *,
        prompt_ids: list[int] | None = None,
        **options: Any,
    ) -> GenerationRequest:
        """Tokenize and check a request; raises a `BadRequestError` for anything that cannot run.
        `prompt_ids` (already tokenized) replaces `string` when given. `options`: temperature, top_p,
        top_k, seed (None: the config's), min_p, presence_penalty, frequency_penalty, repetition_penalty,
        logit_bias ((token id, bias) pairs), stop (strings), ignore_eos, logprobs (top k), timeout_s
        (seconds from submission), constraint (a `Constraint` the answer must match)."""
        engine, tokenizer = self._running()
        ids = list(prompt_ids) if prompt_ids is not None else self.tokenize(string)
        request = new_request(self.config, tokenizer.vocab_size, ids, greedy, max_new_tokens, **options)
        if request.constraint is not None:
            engine.grammars.check(request.constraint)
        return request

    def tokenize(self, text: str) -> list[int]:
        """The token ids of a prompt; a `ContextLengthError` before tokenizing when its characters alone
        show that it cannot fit: no token holds more than `max_token_chars` of them."""
        tokenizer = self._running()[1]
        most = self.config.max_length * tokenizer.max_token_chars
        if len(text) > most:
            raise ContextLengthError(
                f"the prompt has {len(text)} characters: more than the context of {self.config.max_length} "
                f"tokens (max_length) can hold, at most {tokenizer.max_token_chars} characters a token"
            )
        return tokenizer.encode(text)

    def submit(
        self, request: GenerationRequest, loop: asyncio.AbstractEventLoop | None = None
    ) -> OutputStream:
        """Hand a prepared request to the engine; read its chunks from the returned stream."""
        engine, _ = self._running()
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
    def prompts(self) -> PromptBuilder:
        return PromptBuilder(
            self.config,
            self.tokenizer,
            self.process_chat_history,
            self.build_chat_prompt,
            self.build_messages_prompt,
        )

    @property
    def uses_seed_formats(self) -> bool:
        return self.prompts.uses_seed_formats

    def build_instruct_prompt(self, prompt: str, system: str | None = None) -> str:
        return self.prompts.instruct(prompt, system)

    def process_chat_history(self, history: Sequence[Sequence[str]]) -> str:
        """The seed's chat history rendering: one `chat_format` per (prompt, answer) pair."""
        return seed_history(self.config, history)

    def build_chat_prompt(
        self, prompt: str, history: Sequence[Sequence[str]] = (), system: str | None = None
    ) -> str:
        return self.prompts.chat(prompt, history, system)

    def build_messages_prompt(self, messages: Sequence[dict[str, str]]) -> str:
        """The prompt for an OpenAI-style conversation ([{"role", "content"}], ending with a user turn)."""
        self.require_ready()
        return self.prompts.messages(messages)

    def build_tool_prompt(
        self, messages: Sequence[dict[str, Any]], tools: list[dict[str, Any]]
    ) -> str | None:
        """The prompt for a conversation offering tools, when the model's template writes tool calls
        (`PromptBuilder.tool_messages`); None: the server uses its generic tool format."""
        self.require_ready()
        return self.prompts.tool_messages(messages, tools)

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

    def custom_forward(self, route: str) -> Callable[[Any], dict[str, Any]] | None:
        """This object's `forward_instruct` / `forward_chat` (route "instruct" / "chat") when a subclass
        replaced the seed's, so that the HTTP route answers through it."""
        name = f"forward_{route}"
        return getattr(self, name) if getattr(type(self), name) is not getattr(JAXServer, name) else None

    # --- status and serving -----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        cfg = self.model_config
        return {
            "status": "ready" if self.ready else ("failed" if self.load_error else "loading"),
            "error": "the model could not be loaded; the server log says why" if self.load_error else None,
            "model": self.model_name,
            "architecture": cfg.architecture if cfg else None,
            "parameters": cfg.parameter_count if cfg else None,
            "dtype": self.weight_dtype,
            "weights": self.weights,
            "devices": [str(d) for d in jax.devices()],
            "mesh": dict(self.mesh.shape) if self.mesh else None,
            "prompt_format": ("seed" if self.uses_seed_formats else "template") if self.tokenizer else None,
            "uptime_s": round(time.time() - self.started_at, 1),
            "requests_served": self.number_of_served_request_until_last_up_time,
            "tokens_generated": self.engine.tokens_generated if self.engine else 0,
            "engine": self.engine.stats() if self.engine else None,
            "config": self.config.model_dump(mode="json"),
        }

    def engine_stats(self) -> dict[str, Any] | None:
        return self.engine.stats() if self.engine is not None else None

    @property
    def app(self) -> FastAPI:
        """The FastAPI application (built once)."""
        if self._app is None:
            from jaxserver.server.app import create_app

            self._app = create_app(self)
        return self._app

    def fire(self) -> None:
        """Serve the HTTP API with uvicorn on config.host:config.port (blocks)."""
        import uvicorn

        from jaxserver.server.limits import uvicorn_config

        uvicorn.Server(uvicorn_config(self.app, self.config, log_level="info")).run()


def _sampling_fields(data: Any) -> dict[str, Any]:
    return {name: getattr(data, name, None) for name in ("temperature", "top_p", "top_k", "seed")}

"""Gradio pages on the API's FastAPI app: an instruct page, a chat page and a landing page at `/`.

The pages are thin clients of the engine. Each answer is a request submitted through the same
`EngineClient` as the HTTP API's (no second copy of the model), so UI and API users share the batch, its
limits and its metrics. An answer streams chunk by chunk. The Stop and Clear buttons abort the page's request in the engine, which frees its
slot within one decode chunk and ends the answer like any other finish; they do not use Gradio's `cancels`,
whose frontend can mark the stopped output "Error" when the cancel crosses the stream's last message. A
closed tab closes the stream, which aborts the request too. Errors the user can act on (a prompt longer
than the context, a busy or loading server) become Gradio messages, not tracebacks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import html
from collections.abc import AsyncIterator, Callable
from typing import Any

import gradio as gr
from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from starlette.concurrency import run_in_threadpool

from jaxserver.engine.request import GenerationRequest
from jaxserver.errors import JAXServerError
from jaxserver.server.auth import browser_login
from jaxserver.server.backend import Backend
from jaxserver.server.streaming import EngineClient

INSTRUCT_PATH = "/gradio_instruct"
CHAT_PATH = "/gradio_chat"
PAGE_PATHS = (INSTRUCT_PATH, CHAT_PATH)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """The sampling controls' values, in the order `settings_column` lays them out."""

    temperature: float
    top_p: float
    top_k: float  # Gradio sliders give floats
    max_new_tokens: float
    greedy: bool

    def prepare(self, backend: Backend, string: str) -> GenerationRequest:
        """A request for `string`. The answer ends after `max_new_tokens` or when the context is full,
        whichever comes first: a chat grows, and a slider that must track the room left would be a chore."""
        request = backend.prepare(
            string, self.greedy, None, temperature=self.temperature, top_p=self.top_p, top_k=int(self.top_k)
        )
        room = backend.config.max_length - len(request.prompt_ids)
        return dataclasses.replace(request, max_new_tokens=min(int(self.max_new_tokens), room))


def settings_column(backend: Backend) -> tuple[gr.Textbox, list[gr.Component]]:
    """The right-hand column of both pages: the system prompt, then temperature, top-p, top-k, max new
    tokens and greedy, each starting at the server config's default."""
    cfg = backend.config
    with gr.Column(scale=1, min_width=260):
        system = gr.Textbox(
            cfg.system,
            lines=3,
            label="system prompt",
            placeholder="empty: the model's default",
            elem_id="system",
        )
        controls = [
            gr.Slider(0.0, max(2.0, cfg.temperature), cfg.temperature, step=0.05, label="temperature"),
            gr.Slider(0.01, 1.0, cfg.top_p, step=0.01, label="top_p", elem_id="top-p"),
            gr.Slider(0, max(200, cfg.top_k), cfg.top_k, step=1, label="top_k", info="0 turns it off"),
            gr.Slider(
                1,
                cfg.max_length,
                min(cfg.max_new_tokens, cfg.max_length),
                step=1,
                label="max new tokens",
                info=f"the answer also ends when the context ({cfg.max_length} tokens) is full",
                elem_id="max-new-tokens",
            ),
            gr.Checkbox(False, label="greedy", info="always take the most likely token", elem_id="greedy"),
        ]
    return system, controls


class AnswersInFlight:
    """Which engine request answers each browser session of a page, so Stop and Clear can end it.

    Gradio runs at most one event per trigger and session at a time, so a session has at most one answer
    in flight. Both methods are coroutines, which Gradio runs on the server's event loop (it would run
    plain functions in worker threads), so the dicts need no lock."""

    def __init__(self, backend: Backend, client: EngineClient) -> None:
        self._backend, self._client = backend, client
        self._requests: dict[str, str] = {}  # session hash -> request id
        self._cleared: set[str] = set()  # request ids whose answer the user threw away

    async def stop(self, request: gr.Request, clear: bool = False) -> None:
        """Abort the session's answer; with `clear`, its remaining updates must not show it again. The
        entry stays until the answer's stream ends (one decode chunk later), so a Clear right after a Stop
        still finds it. A Stop before the answer's request reaches the engine finds nothing."""
        request_id = self._requests.get(request.session_hash) if request.session_hash else None
        if request_id is not None:
            if clear:
                self._cleared.add(request_id)
            self._backend.abort(request_id)  # a no-op once the request has ended

    async def stream(
        self, request: gr.Request, prompt: Callable[[], str], sampling: Sampling
    ) -> AsyncIterator[str | None]:
        """The answer to `prompt()` as it grows: "" once the engine has the request, then after every
        chunk; None once Clear threw the answer away. Closing this generator early aborts the request."""
        try:
            generation = await run_in_threadpool(lambda: sampling.prepare(self._backend, prompt()))
            streams = self._client.submit([generation])
        except JAXServerError as exc:
            raise gr.Error(exc.message, print_exception=False) from None
        session, request_id = request.session_hash, generation.request_id
        if session:  # a caller without a session (the Gradio API) has no Stop button
            self._requests[session] = request_id
        answer, finished = "", False
        try:
            yield answer
            async with contextlib.aclosing(self._client.chunks(streams)) as chunks:
                async for _, chunk in chunks:
                    answer += chunk.text
                    yield None if request_id in self._cleared else answer
            finished = True
        except JAXServerError as exc:  # the engine failed
            raise gr.Error(exc.message, print_exception=False) from None
        finally:
            if session and self._requests.get(session) == request_id:
                del self._requests[session]
            self._cleared.discard(request_id)
            if not finished:  # closed before its chunks were read (a tab closed at once): free the slot
                self._backend.abort(request_id)
        self._backend.count_request()


def page_header(title: str) -> gr.HTML:
    """The page title and links to the other pages, opening in the same tab (Markdown links open new ones)."""
    links = [
        ("home", "../"),
        ("instruct", f"..{INSTRUCT_PATH}/"),
        ("chat", f"..{CHAT_PATH}/"),
        ("API docs", "../docs"),
    ]
    anchors = " · ".join(f'<a href="{href}" target="_self">{name}</a>' for name, href in links)
    return gr.HTML(f"<h2>jaxserver · {title}</h2><p>{anchors}</p>", js_on_load=None)


def instruct_blocks(backend: Backend, client: EngineClient) -> gr.Blocks:
    with gr.Blocks(title="jaxserver · instruct", analytics_enabled=False) as blocks:
        page_header("instruct")
        with gr.Row():
            with gr.Column(scale=3):
                instruction = gr.Textbox(
                    lines=4,
                    label="instruction",
                    placeholder="What should the model do? (Shift+Enter sends)",
                    elem_id="instruction",
                )
                with gr.Row():
                    generate = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
                answer = gr.Textbox(
                    lines=12, label="answer", interactive=False, buttons=["copy"], elem_id="answer"
                )
            system, controls = settings_column(backend)

        in_flight = AnswersInFlight(backend, client)

        async def respond(
            request: gr.Request, system: str, instruction: str, *values: Any
        ) -> AsyncIterator[str]:
            prompt = lambda: backend.build_instruct_prompt(instruction, system)
            async with contextlib.aclosing(in_flight.stream(request, prompt, Sampling(*values))) as answers:
                async for text in answers:
                    yield text or ""

        gr.on(
            [instruction.submit, generate.click],
            respond,
            [system, instruction, *controls],
            answer,
            show_progress="minimal",
            concurrency_limit=None,  # the engine batches and applies its own limits
            # A send while an answer streams, or ends after Stop, runs once it has ended (not dropped).
            trigger_mode="always_last",
        )
        stop.click(in_flight.stop, queue=False)
    return blocks


def history_pairs(messages: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """[(user, assistant), ...] from the chat window's messages (whose content is a list of parts)."""
    pairs: list[tuple[str, str]] = []
    for message in messages:
        content = message["content"]
        text = content if isinstance(content, str) else "".join(p.get("text", "") for p in content)
        if message["role"] == "user":
            pairs.append((text, ""))
        elif message["role"] == "assistant" and pairs:
            pairs[-1] = (pairs[-1][0], pairs[-1][1] + text)
    return pairs


def chat_blocks(backend: Backend, client: EngineClient) -> gr.Blocks:
    with gr.Blocks(title="jaxserver · chat", analytics_enabled=False) as blocks:
        page_header("chat")
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(
                    height=480, label="chat", elem_id="chatbot", feedback_options=None, buttons=["copy_all"]
                )
                with gr.Row():
                    message = gr.Textbox(
                        scale=4,
                        show_label=False,
                        placeholder="Type a message and press Enter",
                        autofocus=True,
                        elem_id="message",
                    )
                    send = gr.Button("Send", variant="primary", scale=1, min_width=70, elem_id="send")
                    stop = gr.Button("Stop", variant="stop", scale=1, min_width=70, elem_id="stop")
                    clear = gr.Button("Clear", scale=1, min_width=70, elem_id="clear")
            system, controls = settings_column(backend)

        in_flight = AnswersInFlight(backend, client)

        async def respond(
            request: gr.Request, text: str, messages: list[dict[str, Any]], system: str, *values: Any
        ) -> AsyncIterator[tuple[list[dict[str, Any]], Any]]:
            if not text.strip():
                gr.Warning("Type a message first.")
                yield messages, text
                return
            history = history_pairs(messages)
            prompt = lambda: backend.build_chat_prompt(text, history, system)
            asked = [*messages, {"role": "user", "content": text}]
            # The message box is emptied with the first update only: a draft typed while the answer
            # streams (or ends, after Stop) stays.
            draft = ""
            async with contextlib.aclosing(in_flight.stream(request, prompt, Sampling(*values))) as answers:
                async for answer in answers:
                    if answer is None:  # cleared: keep the window empty
                        yield [], draft
                    else:
                        yield [*asked, {"role": "assistant", "content": answer}], draft
                    draft = gr.skip()

        gr.on(
            [message.submit, send.click],
            respond,
            [message, chatbot, system, *controls],
            [chatbot, message],
            show_progress="minimal",
            concurrency_limit=None,  # the engine batches and applies its own limits
            # A send while an answer streams, or ends after Stop, runs once it has ended (not dropped).
            trigger_mode="always_last",
        )

        async def clear_chat(request: gr.Request) -> list[dict[str, Any]]:
            """Empty the conversation; the message box is left alone, so a draft survives a Clear
            whenever its update lands."""
            await in_flight.stop(request, clear=True)
            return []

        stop.click(in_flight.stop, queue=False)
        clear.click(clear_chat, None, chatbot, queue=False)
        chatbot.clear(clear_chat, None, chatbot, queue=False)  # the chat window's own clear icon
    return blocks


LANDING_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>jaxserver</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font-family: system-ui, sans-serif; max-width: 40rem; margin: 3rem auto; padding: 0 1rem; color: #222; }}
a {{ color: #c2410c; }} li {{ margin: 0.6rem 0; }} .muted {{ color: #666; }}
</style></head>
<body>
<h1>jaxserver</h1>
<p class="muted">{model} &middot; {state}</p>
<ul>
<li><a href="{instruct}/">Instruct</a>: a system prompt and one instruction, answered as it is written.</li>
<li><a href="{chat}/">Chat</a>: a conversation with history, a stop button and a clear button.</li>
<li><a href="docs">API docs</a>: <code>/instruct</code>, <code>/chat</code> and the rest of the HTTP API.</li>
<li><a href="status">Status</a>: the model, the engine's slots and counters, the configuration.</li>
</ul>
</body></html>
"""


def mount_ui(app: FastAPI, backend: Backend, client: EngineClient) -> None:
    """Serve the instruct page at /gradio_instruct, the chat page at /gradio_chat and a landing page at /."""

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def landing_page() -> str:
        status = backend.status()
        state = f"{status['status']}: {status['error']}" if status["error"] else status["status"]
        return LANDING_PAGE.format(
            model=html.escape(backend.model_name),
            state=html.escape(state),
            instruct=INSTRUCT_PATH.lstrip("/"),
            chat=CHAT_PATH.lstrip("/"),
        )

    theme = gr.themes.Default(primary_hue="orange")
    api_key = backend.config.api_key
    login = (
        {}
        if api_key is None
        else {
            "auth": browser_login(api_key.get_secret_value()),
            "auth_message": "This server has an API key: sign in with any user name and the key as the password.",
        }
    )
    for path, blocks in (
        (INSTRUCT_PATH, instruct_blocks(backend, client)),
        (CHAT_PATH, chat_blocks(backend, client)),
    ):
        gr.mount_gradio_app(
            app,
            blocks,
            path,
            footer_links=["api", "gradio", "settings"],
            run_history=False,
            theme=theme,
            **login,
        )

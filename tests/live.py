"""A jaxserver served by uvicorn in a thread of the test process on 127.0.0.1, and helpers that read the
engine's state over HTTP."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import requests
import uvicorn

from jaxserver import JAXServer, JAXServerConfig
from jaxserver.launch import free_port
from jaxserver.server.limits import uvicorn_config


@contextlib.contextmanager
def serving(model_dir: Path, config: JAXServerConfig) -> Iterator[tuple[JAXServer, str]]:
    """Load the model, serve its app on a free port; yields (server, base URL); stops both on exit."""
    server = JAXServer.load(model_dir, config=config)
    with served(server) as url:
        yield server, url


@contextlib.contextmanager
def served(server: JAXServer) -> Iterator[str]:
    """Serve a loaded `server`'s app on a free port (with the HTTP limits of its config); yields the base
    URL; stops both on exit."""
    settings = uvicorn_config(
        server.app, server.config, host="127.0.0.1", port=free_port(), log_level="warning"
    )
    http = uvicorn.Server(settings)
    thread = threading.Thread(target=http.run, daemon=True)
    thread.start()
    while not http.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{http.config.port}"
    finally:
        http.should_exit = True
        thread.join(timeout=10)
        server.shutdown(drain_timeout_s=0)


def sdk_client(url: str, key: str = "unused") -> openai.OpenAI:
    """The `openai` client of a served URL, without retries."""
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def engine_stats(url: str) -> dict:
    return requests.get(f"{url}/status", timeout=10).json()["engine"]


def wait_until_idle(url: str, timeout_s: float = 10.0) -> float:
    """Seconds until no slot is busy and no request waits; fails after `timeout_s`."""
    started = time.monotonic()
    while (stats := engine_stats(url))["running_requests"] or stats["waiting_requests"]:
        assert time.monotonic() - started < timeout_s, stats
        time.sleep(0.02)
    return time.monotonic() - started

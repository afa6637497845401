"""The HTTP server of `jaxserver serve`, and how it ends: a drain on SIGTERM or SIGINT, an exit after the engine fails or the model
does not load (docs/reliability.md)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

import uvicorn

from jaxserver.jaxserver import JAXServer
from jaxserver.server.limits import uvicorn_config

log = logging.getLogger("jaxserver")

EXIT_GRACE_S = 2.0  # after a failure: time for the error events and /health's 503 to reach clients


class DrainingServer(uvicorn.Server):
    """uvicorn over a `JAXServer`'s app. On the first SIGTERM/SIGINT it keeps listening while it drains:
    new requests get 503 and /health says the server is shutting down, running ones may finish for up to
    drain_timeout_s and the rest end with finish_reason "abort"; only then does uvicorn stop. A second
    signal is uvicorn's own (stop now). A failed engine is not restarted in place: the process exits 1
    after EXIT_GRACE_S, for its supervisor to start a fresh one."""

    def __init__(self, server: JAXServer, stop_group: Callable[[], None] = lambda: None):
        drain_s = server.config.drain_timeout_s
        # The app is built before the model loads, not beside it: Python 3.11's ast.parse (Gradio's
        # import calls it) fails when another thread parses at the same time.
        super().__init__(uvicorn_config(server.app, server.config, timeout_graceful_shutdown=drain_s + 10))
        self.jax_server, self.stop_group, self.drain_s = server, stop_group, drain_s
        self.draining = False
        self.engine_failed = threading.Event()
        server.on_engine_failure = self._exit_after_failure

    def handle_exit(self, sig: int, frame) -> None:
        if self.draining:
            super().handle_exit(sig, frame)
            return
        self.draining = True
        log.info("draining: running requests may finish for %g s", self.drain_s)

        def drain_then_stop() -> None:
            self.jax_server.shutdown(self.drain_s)
            uvicorn.Server.handle_exit(self, sig, frame)

        threading.Thread(target=drain_then_stop, name="jaxserver-drain", daemon=True).start()

    async def shutdown(self, sockets=None) -> None:
        await super().shutdown(sockets)
        # Before uvicorn re-raises the signal: the other processes of a group stop once the engine has,
        # so that they exit cleanly rather than by losing process 0.
        await asyncio.to_thread(self.jax_server.shutdown, self.drain_s)
        await asyncio.to_thread(self.stop_group)

    def _exit_after_failure(self, reason: str) -> None:
        log.error("the engine failed (%s); exiting in %g s", reason, EXIT_GRACE_S)
        self.engine_failed.set()
        threading.Timer(EXIT_GRACE_S, setattr, args=(self, "should_exit", True)).start()

    def serve_loading(self, model: str | None) -> int:
        """Load `model` beside the HTTP server and serve until stopped: 0 after a drain, 1 when the model
        could not load or the engine failed."""

        def load() -> None:
            started = time.perf_counter()
            try:
                self.jax_server.load_model(model)
                config = self.jax_server.config
                elapsed = time.perf_counter() - started
                log.info("ready in %.1f s: http://%s:%d (docs at /docs)", elapsed, config.host, config.port)
            except Exception as exc:  # noqa: BLE001 - any failure is reported, then serving stops
                log.error("could not load the model: %s", exc)
                self.should_exit = True

        threading.Thread(target=load, name="model-loader", daemon=True).start()
        self.run()
        return 1 if self.jax_server.load_error or self.engine_failed.is_set() else 0

"""Process 0 of a group: the server whose device calls every other process replays, and what it does when
a member fails (docs/multihost.md)."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

import jax

from jaxserver.http_server import EXIT_GRACE_S
from jaxserver.jaxserver import JAXServer
from jaxserver.parallel.group import GroupSettings, Heartbeats, StepChannel, check_same_settings

log = logging.getLogger(__name__)


def lead(server: JAXServer, settings: GroupSettings, model: str | None) -> Callable[[], None]:
    """Make `server` process 0 of the group: its device calls go to the other processes, and a member that
    fails (no heartbeat, a failed collective) ends every request with an error, turns /health 503 with
    the reason and ends this process with exit code 1. Returns what stops the others after a drain."""
    server.channel = StepChannel()
    check_same_settings(server.channel, server.config, model)
    failed = threading.Event()

    def fail(reason: str) -> None:
        if failed.is_set():
            return
        failed.set()
        message = f"the process group failed: {reason}"
        log.error("%s; ending every request, exiting in %g s", message, EXIT_GRACE_S)
        heartbeats.report(reason)
        if server.engine is not None:
            server.engine.fail(message)
        else:
            server.load_error = message
        threading.Timer(EXIT_GRACE_S, os._exit, args=(1,)).start()

    heartbeats = Heartbeats(
        settings.heartbeat_timeout_s,
        fail,
        local_error=lambda: server.engine.error if server.engine is not None else None,
    )
    heartbeats.start()

    def stop_group() -> None:
        heartbeats.stop()
        if not failed.is_set() and server.engine is not None and server.engine.error is None:
            log.info("stopping the other %d processes", settings.num_processes - 1)
            server.channel.send(("stop", ()))
            jax.distributed.shutdown()  # waits for them at JAX's shutdown barrier, so none sees us gone

    return stop_group

"""A process other than 0 of a group (`jaxserver serve --process-id 1..`): it loads the same model, builds
the executor process 0 describes, and runs every device call process 0 announces until it says stop. It
answers only `/health`, on its own port; any failure ends it with a non-zero exit, and the group with it.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any, NoReturn

import jax

from jaxserver.config import JAXServerConfig
from jaxserver.engine import setup as engine_setup
from jaxserver.engine.executor import REPLAYED_CALLS, Executor
from jaxserver.model import cpu_kernels
from jaxserver.model.loader import load_model
from jaxserver.parallel.group import (
    ExecutorSetup,
    GroupError,
    GroupSettings,
    Heartbeats,
    StepChannel,
    check_same_settings,
)
from jaxserver.parallel.mesh import make_mesh, paged_cache_sharding, shard_params

log = logging.getLogger(__name__)

EXIT_GRACE_S = 1.0  # after a failure: time for /health to say why before the process ends


class WorkerHealth:
    """What the worker's /health answers: 503 with the state until it follows process 0, then 200."""

    def __init__(self) -> None:
        self.state = "loading the model"
        self.ready = False

    def app(self) -> Any:
        from fastapi import FastAPI
        from fastapi.responses import JSONResponse

        from jaxserver.server.responses import error_body

        app = FastAPI(title="jaxserver worker", docs_url=None, redoc_url=None, openapi_url=None)

        @app.get("/health")
        def health() -> JSONResponse:
            if self.ready:
                return JSONResponse({"status": "ok", "role": "worker"})
            body = error_body(self.state, "service_unavailable") | {"status": "down"}
            return JSONResponse(body, 503)

        return app


def serve_worker(config: JAXServerConfig, model_path: str | None, settings: GroupSettings) -> NoReturn:
    """Run this process's part of the group, then end the process: 0 once process 0 stops the group, 1
    after any failure."""
    import uvicorn

    from jaxserver.server.limits import uvicorn_config

    health = WorkerHealth()
    http = uvicorn.Server(uvicorn_config(health.app(), config, log_level="warning"))
    threading.Thread(target=http.run, name="jaxserver-worker-health", daemon=True).start()

    def fail(reason: str) -> None:
        health.ready, health.state = False, "the process group failed; the log says why"
        heartbeats.report(reason)
        log.error("the process group failed: %s; this worker exits", reason)
        threading.Timer(EXIT_GRACE_S, os._exit, args=(1,)).start()

    # SIGTERM ends a worker at once (a Python handler would wait for the main thread, which may sit in a
    # collective): process 0 then fails the group.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    heartbeats = Heartbeats(settings.heartbeat_timeout_s, fail)
    heartbeats.start()
    try:
        channel = StepChannel()
        check_same_settings(channel, config, model_path)
        executor = _build_executor(config, model_path, health, channel)
        health.ready, health.state = True, "following process 0"
        log.info("worker %d ready: following process 0", settings.process_id)
        follow(executor, channel)
    except Exception as exc:
        log.exception("worker %d failed", settings.process_id)
        fail(str(exc))
        threading.Event().wait()  # the exit timer ends the process
    heartbeats.stop()
    log.info("worker %d: process 0 stopped the group", settings.process_id)
    jax.distributed.shutdown()  # process 0 waits for every process at JAX's shutdown barrier
    # At once: the daemon threads (health server, compilation) may be inside JAX, which a normal
    # interpreter exit would tear down under them.
    logging.shutdown()
    os._exit(0)


def _build_executor(
    config: JAXServerConfig, model_path: str | None, health: WorkerHealth, channel: StepChannel
) -> Executor:
    """The model loaded and placed as process 0 placed it, and the executor process 0 describes."""
    keep_codes = config.quantization != "none"
    model, params, _ = load_model(
        model_path, engine_setup.host_dtype(config), config.model_cache_dir, keep_codes
    )
    health.state = "waiting for process 0's model"
    name, (setup,) = channel.receive()
    if name != "setup" or not isinstance(setup, ExecutorSetup):
        raise GroupError(f"expected process 0's model setup, got {name!r}")
    if setup.model != model:
        raise GroupError(
            f"this process loaded another model than process 0 ({model_path or 'the default'}): start every "
            "process with the same --model"
        )
    mesh = make_mesh(config.mesh_axes_names, config.mesh_axes_shape)
    if tuple(mesh.devices.shape) != setup.mesh_shape:
        raise GroupError(
            f"--mesh-axes-shape gives {tuple(mesh.devices.shape)} here and {setup.mesh_shape} on process 0: "
            "start every process with the same one"
        )
    if setup.attention_kernel and not cpu_kernels.available():
        raise GroupError("process 0 reads the KV cache with the CPU kernel, which cannot be built here")
    health.state = "placing the model"
    placed = shard_params(engine_setup.serving_params(config, params, setup.weight_dtype), mesh)
    executor = Executor(
        model,
        placed,
        **setup.executor,
        cache_sharding=paged_cache_sharding(model, mesh),
        attention=setup.attention(),
    )
    if config.warm_up:
        threading.Thread(target=engine_setup.compile_quietly, args=(executor,), daemon=True).start()
    return executor


def follow(executor: Executor, channel: StepChannel) -> None:
    """Run every call process 0 announces, in order, until it sends "stop"."""
    while True:
        name, args = channel.receive()
        if name == "stop":
            return
        if name not in REPLAYED_CALLS:
            raise GroupError(f"process 0 announced an unknown call {name!r}")
        getattr(executor, name)(*args)

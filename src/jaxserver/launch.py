"""Start `jaxserver serve` in a child process on 127.0.0.1 and wait until it is ready (for benchmarks and
end-to-end tests)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    process: subprocess.Popen
    url: str
    log_path: Path

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the log, without the access lines of our own readiness polls."""
        lines = self.log_path.read_text(errors="replace").splitlines(keepends=True)
        return "".join(line for line in lines if '"GET /status HTTP' not in line and "[Gloo]" not in line)[
            -chars:
        ]

    def stop(self, timeout_s: float = 30) -> int:
        self.process.terminate()
        return self.process.wait(timeout=timeout_s)


def spawn_server(flags: list[str], log_path: Path, env: dict[str, str] | None = None) -> ServerProcess:
    """Run `jaxserver serve --host 127.0.0.1 --port <free> *flags`, logging to `log_path`."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "jaxserver.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *flags,
    ]
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env or dict(os.environ))
    return ServerProcess(process, f"http://127.0.0.1:{port}", log_path)


def start_server(
    flags: list[str], log_path: Path, *, timeout_s: float = 300, env: dict[str, str] | None = None
) -> ServerProcess:
    """`spawn_server`, returned once /status says ready. Raises RuntimeError (with the log's tail) if it
    exits or times out first."""
    server = spawn_server(flags, log_path, env)
    process = server.process
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{server.url}/status", timeout=2).json()["status"] == "ready":
                return server
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            raise RuntimeError(f"jaxserver serve exited with {process.returncode}:\n{server.log_tail()}")
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"jaxserver serve was not ready after {timeout_s} s:\n{server.log_tail()}")


def start_group(
    flags: list[str],
    log_dir: Path,
    *,
    processes: int = 2,
    devices_each: int = 4,
    timeout_s: float = 300,
) -> list[ServerProcess]:
    """A group of `processes` servers on 127.0.0.1 with `devices_each` CPU devices each (docs/multihost.md),
    process 0 first in the list; returned once process 0 is ready. Raises RuntimeError as `start_server`
    does, the other processes killed."""
    env = os.environ | {
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_each}",
    }
    group = ["--coordinator-address", f"127.0.0.1:{free_port()}", "--num-processes", str(processes)]
    workers = [
        spawn_server([*flags, *group, "--process-id", str(i)], log_dir / f"process-{i}.log", env)
        for i in range(1, processes)
    ]
    try:
        leader = start_server(
            [*flags, *group, "--process-id", "0"], log_dir / "process-0.log", timeout_s=timeout_s, env=env
        )
    except RuntimeError as exc:
        for worker in workers:
            worker.process.kill()
        tails = "".join(f"\n--- process {i}:\n{w.log_tail()}" for i, w in enumerate(workers, start=1))
        raise RuntimeError(f"{exc}{tails}") from exc
    return [leader, *workers]


def wait_until_compiled(url: str, timeout_s: float = 1800) -> None:
    """Wait until the server at `url` has compiled the programs it compiles beside serving: meanwhile that
    compilation takes a core, and figures taken then would measure it too."""
    deadline = time.monotonic() + timeout_s
    while httpx.get(f"{url}/status", timeout=10).json()["engine"].get("programs_compiling", 0):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} was still compiling after {timeout_s} s")
        time.sleep(1)

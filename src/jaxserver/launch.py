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
        return "".join(line for line in lines if '"GET /status HTTP' not in line)[-chars:]

    def stop(self, timeout_s: float = 30) -> int:
        self.process.terminate()
        return self.process.wait(timeout=timeout_s)


def start_server(
    flags: list[str], log_path: Path, *, timeout_s: float = 300, env: dict[str, str] | None = None
) -> ServerProcess:
    """Run `jaxserver serve --host 127.0.0.1 --port <free> *flags`, logging to `log_path`; return once
    /status says ready. Raises RuntimeError (with the log's tail) if it exits or times out first."""
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
    server = ServerProcess(process, f"http://127.0.0.1:{port}", log_path)
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

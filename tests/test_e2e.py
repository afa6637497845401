"""End to end: `jaxserver serve` with the embedded SmolLM2-135M-Instruct, driven over HTTP on 127.0.0.1."""

import os
import socket
import subprocess
import sys
import time

import pytest
import requests

pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    port = free_port()
    env = os.environ | {"XLA_FLAGS": ""}  # one device, as a user's machine would have
    log = open(tmp_path_factory.mktemp("serve") / "serve.log", "w+")  # noqa: SIM115 - closed below
    command = [
        sys.executable,
        "-m",
        "jaxserver.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-length",
        "1024",
    ]
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            try:
                if requests.get(f"{url}/status", timeout=2).json()["status"] == "ready":
                    break
            except requests.ConnectionError:
                pass
            assert process.poll() is None, "the server exited"
            time.sleep(1)
        else:
            raise TimeoutError("the server did not become ready")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.seek(0)
        print(log.read()[-3000:])
        log.close()


def test_instruct_knows_the_capital_of_france(base_url):
    body = requests.post(
        f"{base_url}/instruct", json={"prompt": "What is the capital of France?"}, timeout=120
    ).json()
    assert "Paris" in body["response"]


def test_chat_follows_the_history(base_url):
    history = [["What is the capital of France?", "The capital of France is Paris."]]
    data = {"prompt": "And of Germany?", "history": history, "greedy": True}
    assert "Berlin" in requests.post(f"{base_url}/chat", json=data, timeout=120).json()["response"]


def test_stream_and_status(base_url):
    data = {"prompt": "Count from one to five.", "stream": True, "max_new_tokens": 40}
    with requests.post(f"{base_url}/instruct", json=data, stream=True, timeout=120) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and len(lines) >= 3
    status = requests.get(f"{base_url}/status", timeout=10).json()
    assert status["model"] == "SmolLM2-135M-Instruct" and status["parameters"] == 134515008
    assert status["requests_served"] >= 2 and len(status["devices"]) == 1

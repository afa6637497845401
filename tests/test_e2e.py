"""End to end: `jaxserver serve` with the embedded SmolLM2-135M-Instruct, driven over HTTP on 127.0.0.1."""

import os

import pytest
import requests

from jaxserver.launch import start_server

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = os.environ | {"XLA_FLAGS": ""}  # one device, as a user's machine would have
    # Four slots keep the warm-up's decode shapes few; a cold compile cache still takes minutes here.
    server = start_server(["--max-length", "1024", "--max-batch-size", "4"], log, env=env, timeout_s=600)
    yield server.url
    server.stop()
    print(server.log_tail())


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

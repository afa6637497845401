"""The seed routes over a tiny model: answers, streaming, status, and the error contract."""

import json

import pytest
from fastapi.testclient import TestClient

from jaxserver import JAXServer
from tests import tiny


@pytest.fixture(scope="module")
def client(tiny_server):
    return TestClient(tiny_server.app)


def sse_events(response) -> list:
    events = [line[len("data: ") :] for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_instruct_answers_with_seed_fields(client, tiny_server):
    body = client.post("/instruct", json={"prompt": "Hello", "greedy": True, "max_new_tokens": 5}).json()
    assert set(body) == {"input", "response", "tokens_used"}
    assert body["input"] == tiny_server.build_instruct_prompt("Hello")
    assert body["input"].startswith("<|im_start|>user\nHello")  # the model's chat template
    assert 1 <= body["tokens_used"] <= 5


def test_chat_uses_history(client, tiny_server):
    data = {"prompt": "And Germany?", "history": [["France?", "Paris."]], "greedy": True, "max_new_tokens": 4}
    body = client.post("/chat", json=data).json()
    assert "<|im_start|>user\nFrance?<|im_end|>\n<|im_start|>assistant\nParis.<|im_end|>" in body["input"]
    assert body["input"].endswith("<|im_start|>user\nAnd Germany?<|im_end|>\n<|im_start|>assistant\n")


def test_stream_matches_non_streaming_answer(client):
    data = {"prompt": "Hello", "greedy": True, "max_new_tokens": 20}
    whole = client.post("/instruct", json=data).json()
    events = sse_events(client.post("/instruct", json=data | {"stream": True}))
    assert len(events) > 1  # one event per chunk (8 tokens per chunk here)
    assert "".join(e["delta"] for e in events) == whole["response"] == events[-1]["response"]
    assert events[-1]["tokens_used"] == whole["tokens_used"]
    assert events[-1]["finish_reason"] in ("stop", "length")


def test_status_reports_model_and_counters(client):
    before = client.get("/status").json()
    client.post("/instruct", json={"prompt": "Hi", "max_new_tokens": 3})
    after = client.get("/status").json()
    assert after["status"] == "ready" and after["architecture"] == "LlamaForCausalLM"
    assert after["parameters"] > 0 and after["config"]["port"] == 2059
    assert after["mesh"] == {"dp": 1, "fsdp": 8, "mp": 1}
    assert after["requests_served"] == before["requests_served"] + 1
    assert after["tokens_generated"] > before["tokens_generated"]


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": "x", "temperature": -1}, "temperature"),
        ({"prompt": "x", "top_p": 1.5}, "top_p"),
        ({"prompt": "x", "max_new_tokens": "ten"}, "max_new_tokens"),
        ({"prompt": ""}, "prompt"),
        ({}, "prompt"),
        ({"prompt": "x", "history": "not a list"}, "history"),
        ({"prompt": "x", "timeout": 0}, "timeout"),
        ({"prompt": "x", "seed": 2**70}, "seed"),
    ],
)
def test_invalid_body_is_422_naming_the_field(client, body, param):
    path = "/chat" if "history" in body else "/instruct"
    response = client.post(path, json=body)
    assert response.status_code == 422
    assert response.json()["error"]["param"].startswith(param)


def test_malformed_json_is_400_and_server_keeps_working(client):
    response = client.post(
        "/instruct", content=b'{"prompt": "x"', headers={"content-type": "application/json"}
    )
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]
    assert client.post("/instruct", json={"prompt": "x", "max_new_tokens": 2}).status_code == 200


def test_prompt_over_max_length_is_400_with_the_limit(client):
    response = client.post("/instruct", json={"prompt": "word " * 400})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and "128" in error["message"]


def test_prompt_plus_max_new_tokens_over_context_is_400(client):
    response = client.post("/instruct", json={"prompt": "Hello", "max_new_tokens": 500})
    assert response.status_code == 400 and response.json()["error"]["param"] == "max_new_tokens"


def test_generation_routes_answer_503_until_ready():
    client = TestClient(JAXServer(tiny.test_config()).app)
    for path in ("/instruct", "/chat"):
        response = client.post(path, json={"prompt": "hi"})
        assert response.status_code == 503 and response.json()["status"] == "down"
    assert client.get("/status").json()["status"] == "loading"
    assert client.get("/docs").status_code == 200


def test_seed_prompt_format_when_chosen(tiny_llama_dir):
    server = JAXServer.load(tiny_llama_dir, config=tiny.test_config(prompt_format="seed", system="Be brief."))
    body = TestClient(server.app).post("/instruct", json={"prompt": "Hi", "max_new_tokens": 2}).json()
    assert body["input"] == "### SYSTEM:\nBe brief.\n### INSTRUCT:\nHi\n### ASSISTANT:\n"
    chat = server.build_chat_prompt("Next", [["Q", "A"]])
    assert chat == "Be brief.<|prompter|>Q</s><|assistant|>A</s><|prompter|>Next</s><|assistant|>"


def test_oversized_body_is_413(tiny_server):
    client = TestClient(tiny_server.app)
    limit = tiny_server.config.max_body_bytes
    response = client.post("/instruct", json={"prompt": "x" * (limit + 1)})
    assert response.status_code == 413 and str(limit) in response.json()["error"]["message"]


@pytest.mark.parametrize("path", ["/instruct", "/v1/completions"])
def test_timeout_reaches_the_engine_with_the_request(client, tiny_server, monkeypatch, path):
    """The body's `timeout` (seconds) becomes the engine request's timeout (tests/test_engine.py checks
    what the engine does with it); a request that finishes in time answers as usual."""
    submitted = []
    submit = tiny_server.submit
    monkeypatch.setattr(
        tiny_server, "submit", lambda request, loop=None: submitted.append(request) or submit(request, loop)
    )
    body = {"prompt": "Hello", "timeout": 30} | (
        {"max_new_tokens": 3} if path == "/instruct" else {"max_tokens": 3}
    )
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    assert [r.timeout_s for r in submitted] == [30]


def test_top_k_past_the_vocabulary_means_all_tokens_and_the_engine_lives_on(client, tiny_server):
    """A top_k larger than any int32 (found by schema fuzzing) once overflowed in the engine thread and
    stopped the engine for every client; above the vocabulary it now means no top-k, as 0 does."""
    body = {"prompt": "Hello", "max_new_tokens": 4, "seed": 3, "temperature": 1.0}
    wide = client.post("/instruct", json=body | {"top_k": 2**62})
    assert wide.status_code == 200, wide.text
    assert wide.json() == client.post("/instruct", json=body | {"top_k": 0}).json()
    assert client.get("/health").json() == {"status": "ok"}

"""Exact answers through the engine and the HTTP routes over the fake runner (tests/fake_runner.py): a
prompt ending in a space is answered with the alphabet, one ending in "w" with "xyz", so every text,
chunk and count below is worked out by hand."""

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from jaxserver.engine.request import GenerationRequest, SamplingOptions
from tests.fake_runner import EOS, MODEL, FakeServer

ALPHABET = "abcdefghijklmnopqrstuvwxyz"
MODEL_NAME = MODEL.architecture


@pytest.fixture(scope="module")
def server():
    server = FakeServer.start(max_num_seqs=4, max_num_batched_tokens=64, max_compile_tokens=4)
    yield server
    server.shutdown(drain_timeout_s=0)


@pytest.fixture(scope="module")
def client(server):
    return TestClient(server.app)


def sse_data(response) -> list:
    events = [line[len("data: ") :] for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_the_engine_streams_the_prefill_token_then_decode_calls_of_four(server):
    ids = server.tokenizer.encode("w ")
    request = GenerationRequest(ids, 40, SamplingOptions(greedy=True))
    chunks = list(server.engine.submit(request))
    # "a" from the prompt's step, then decode calls of max_compile_tokens, then EOS ends it.
    assert [c.text for c in chunks] == ["a", "bcde", "fghi", "jklm", "nopq", "rstu", "vwxy", "z"]
    assert chunks[-1].token_ids == [ord("z"), EOS] and chunks[-1].finish_reason == "stop"
    assert chunks[-1].tokens_generated == 27


def test_instruct_answers_with_the_alphabet(client, server):
    body = client.post("/instruct", json={"prompt": "Hello", "max_new_tokens": 100}).json()
    assert body["input"] == "user: Hello\nassistant: "  # the tokenizer's chat template
    assert body["response"] == ALPHABET and body["tokens_used"] == 27


def test_instruct_stream_sends_the_same_text_in_chunks(client):
    data = {"prompt": "Hello", "max_new_tokens": 10, "stream": True}
    events = sse_data(client.post("/instruct", json=data))
    assert [e["delta"] for e in events if e["delta"]] == ["a", "bcde", "fghi", "j"]
    assert events[-1]["response"] == ALPHABET[:10] and events[-1]["finish_reason"] == "length"


@pytest.mark.parametrize(
    ("body", "text", "finish", "completion_tokens"),
    [
        ({"prompt": "w", "max_tokens": 10}, "xyz", "stop", 4),
        ({"prompt": "a", "max_tokens": 3}, "bcd", "length", 3),
        ({"prompt": " ", "max_tokens": 20, "stop": ["ef"]}, "abcd", "stop", 6),
        ({"prompt": "w", "max_tokens": 10, "ignore_eos": True}, "xyz" + "abcdef", "length", 10),
    ],
    ids=["eos", "length", "stop-string", "ignore-eos"],
)
def test_completions_answer_exactly(client, body, text, finish, completion_tokens):
    answer = client.post("/v1/completions", json={"model": MODEL_NAME} | body).json()
    choice = answer["choices"][0]
    assert (choice["text"], choice["finish_reason"]) == (text, finish)
    prompt_tokens = len(body["prompt"].encode())
    assert answer["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def test_chat_completion_stream_deltas_add_up_to_the_answer(client):
    data = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 6,
        "stream": True,
    }
    events = sse_data(client.post("/v1/chat/completions", json=data))
    deltas = [e["choices"][0]["delta"].get("content", "") for e in events if e["choices"]]
    assert "".join(deltas) == "abcdef"
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "length"


def test_concurrent_requests_beyond_the_rows_each_get_their_own_answer(client, server):
    """12 requests over 4 rows: each answer follows from its own prompt's last letter."""
    prompts = [f"p{letter}" for letter in "abcdefghijkl"]

    def answer(prompt: str) -> str:
        body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 30}
        return client.post("/v1/completions", json=body).json()["choices"][0]["text"]

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(answer, prompts))
    assert answers == [ALPHABET[ALPHABET.index(p[-1]) + 1 :] for p in prompts]
    assert server.engine.stats()["running_requests"] == 0

"""End to end: `jaxserver serve` with the embedded SmolLM2-135M-Instruct, driven over HTTP on 127.0.0.1."""

import json
import os

import openai
import pytest
import requests
from pydantic import BaseModel, Field

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


class City(BaseModel):
    name: str = Field(max_length=40)
    country: str = Field(max_length=40)


def test_sdk_parse_and_a_two_turn_tool_loop(base_url):
    """The SDK's parse() returns the pydantic object; a tool loop (call, result, answer) runs, streamed
    and not."""
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    ask = [{"role": "user", "content": "Name the capital of France and its country."}]
    parsed = client.chat.completions.parse(model=model, messages=ask, response_format=City, max_tokens=80)
    assert isinstance(parsed.choices[0].message.parsed, City)
    weather = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 40}},
                "required": ["city"],
            },
        },
    }
    turn = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(
        model=model, messages=turn, tools=[weather], tool_choice="required", max_tokens=80, temperature=0
    ).choices[0]
    assert first.finish_reason == "tool_calls"
    call = first.message.tool_calls[0]
    assert call.function.name == "get_weather" and "city" in json.loads(call.function.arguments)
    turn += [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny and 21 degrees Celsius."},
    ]
    streamed = client.chat.completions.create(
        model=model, messages=turn, tools=[weather], max_tokens=120, temperature=0, stream=True
    )
    text, reasons = "", []
    for chunk in streamed:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            reasons += [choice.finish_reason] if choice.finish_reason else []
    assert reasons in (["stop"], ["tool_calls"], ["length"])
    if reasons == ["stop"]:
        assert text.strip()

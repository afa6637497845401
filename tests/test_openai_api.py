"""The OpenAI-compatible routes, driven by the real `openai` client against a live server (uvicorn on
127.0.0.1, in this process) over a tiny random model with an API key; plus /tokenize, /health, /metrics,
auth and CORS."""

import functools
import json
import time

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from jaxserver import JAXServer
from jaxserver.engine.request import GenerationChunk, OutputStream
from jaxserver.model import paged
from tests import tiny
from tests.live import sdk_client, serving

KEY = "test-key-0123"
HELLO = [{"role": "user", "content": "Hello world! How are you today?"}]


@pytest.fixture(scope="module")
def live(tiny_llama_dir):
    with serving(
        tiny_llama_dir,
        tiny.test_config(max_length=256, max_batch_size=8, max_waiting_requests=8, api_key=KEY),
    ) as served:
        yield served


@pytest.fixture(scope="module")
def client(live):
    return sdk_client(live[1], KEY)


@pytest.fixture(scope="module")
def chat(client, live):
    return functools.partial(client.chat.completions.create, model=live[0].model_name)


@pytest.fixture(scope="module")
def complete(client, live):
    return functools.partial(client.completions.create, model=live[0].model_name)


def post(url: str, path: str, body: dict, key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{url}{path}", json=body, headers=headers, timeout=60)


def metric_values(url: str) -> dict[tuple, float]:
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_models_lists_the_served_model(client, live):
    server, _ = live
    models = client.models.list().data
    assert [m.id for m in models] == [server.model_name]
    assert client.models.retrieve(server.model_name).id == server.model_name
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("gpt-17")
    assert info.value.body["code"] == "model_not_found"


def test_chat_matches_the_seed_chat_route(chat, live):
    _, url = live
    answer = chat(messages=HELLO, temperature=0, max_tokens=12, user="someone")
    choice = answer.choices[0]
    assert answer.object == "chat.completion" and answer.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    seed = post(url, "/chat", {"prompt": HELLO[0]["content"], "greedy": True, "max_new_tokens": 12}).json()
    assert choice.message.content == seed["response"]  # same template path, same greedy tokens
    tokenized = post(url, "/tokenize", {"messages": HELLO}).json()
    assert answer.usage.prompt_tokens == tokenized["count"]
    assert answer.usage.completion_tokens == seed["tokens_used"]
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


def test_chat_stream_matches_the_whole_answer(chat):
    common = {"messages": HELLO, "temperature": 0, "max_tokens": 20}
    whole = chat(**common)
    chunks = list(chat(**common, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage  # include_usage: one last chunk


def test_content_parts_and_developer_role(chat):
    plain = chat(messages=HELLO, temperature=0, max_tokens=6)
    parts = [{"type": "text", "text": "Hello world!"}, {"type": "text", "text": "How are you today?"}]
    split = chat(
        messages=[{"role": "developer", "content": "Be brief."}, {"role": "user", "content": parts}],
        temperature=0,
        max_tokens=6,
    )
    assert split.usage.prompt_tokens > plain.usage.prompt_tokens  # the system turn was rendered
    with pytest.raises(openai.BadRequestError) as info:
        image = {"type": "image_url", "image_url": {"url": "http://x/y.png"}}
        chat(messages=[{"role": "user", "content": [image]}], max_tokens=2)
    assert info.value.body["param"] == "messages.0.content.0"


def test_completions_prompt_forms_and_length(complete, live):
    _, url = live
    ids = post(url, "/tokenize", {"prompt": "The capital of France"}).json()["tokens"]
    common = {"temperature": 0, "max_tokens": 5, "extra_body": {"ignore_eos": True}}
    one = complete(prompt="The capital of France", **common)
    assert one.object == "text_completion" and one.id.startswith("cmpl-")
    assert one.choices[0].finish_reason == "length" and one.usage.completion_tokens == 5
    assert complete(prompt=ids, **common).choices[0].text == one.choices[0].text
    several = complete(prompt=["The capital of France", "Hello"], n=2, **common)
    assert [c.index for c in several.choices] == [0, 1, 2, 3]
    assert several.choices[0].text == several.choices[1].text == one.choices[0].text  # greedy
    assert several.usage.prompt_tokens == len(ids) + len(
        post(url, "/tokenize", {"prompt": "Hello"}).json()["tokens"]
    )
    assert several.usage.completion_tokens == 4 * 5
    streamed = complete(prompt=[ids, ids], stream=True, **common)
    texts = ["", ""]
    for chunk in streamed:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == [one.choices[0].text] * 2


def test_stop_strings_end_the_answer_before_them(complete):
    common = {
        "prompt": "Numbers like",
        "temperature": 0,
        "max_tokens": 24,
        "extra_body": {"ignore_eos": True},
    }
    full = complete(**common).choices[0].text
    stop = full[8:11]
    assert len(stop) == 3
    stopped = complete(**common, stop=[stop, "never appears"]).choices[0]
    assert stopped.text == full[: full.index(stop)] and stopped.finish_reason == "stop"
    streamed = complete(**common, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == stopped.text


def test_seeds_reproduce_and_n_choices_differ(complete):
    common = {"prompt": "Hello", "temperature": 1.0, "max_tokens": 12, "extra_body": {"ignore_eos": True}}
    first = complete(**common, seed=7).choices[0].text
    assert complete(**common, seed=7).choices[0].text == first
    batch = complete(**common, seed=7, n=3).choices
    assert batch[0].text == first  # choice i is seeded with seed + i, alone or in a batch
    assert batch[1].text == complete(**common, seed=8).choices[0].text
    assert len({c.text for c in batch}) == 3


def test_logprobs(chat, complete):
    answer = chat(messages=HELLO, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3)
    entries = answer.choices[0].logprobs.content
    assert len(entries) == answer.usage.completion_tokens
    for entry in entries:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.logprob == pytest.approx(
            entry.top_logprobs[0].logprob, abs=1e-5
        )  # greedy: the top token
        assert bytes(entry.bytes).decode() == entry.token
    text = complete(prompt="Hello", temperature=0, max_tokens=6, logprobs=2)
    logprobs = text.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == text.usage.completion_tokens
    assert all(len(top) <= 2 for top in logprobs.top_logprobs) and logprobs.text_offset[0] == 0
    with pytest.raises(openai.BadRequestError):
        chat(messages=HELLO, max_tokens=2, top_logprobs=2)


def test_min_p_one_is_greedy_and_penalties_are_accepted(complete):
    common = {"prompt": "The capital of", "max_tokens": 10}
    greedy = complete(**common, temperature=0, extra_body={"ignore_eos": True}).choices[0].text
    only_top = complete(**common, temperature=1.0, seed=3, extra_body={"min_p": 1.0, "ignore_eos": True})
    assert only_top.choices[0].text == greedy  # min_p 1 keeps only the most likely token
    penalized = complete(
        **common,
        temperature=0,
        presence_penalty=1.5,
        frequency_penalty=1.0,
        extra_body={"repetition_penalty": 1.3, "ignore_eos": True},
    )
    assert penalized.usage.completion_tokens == 10


def test_logit_bias_reaches_the_sampler_on_both_routes(complete, chat, live):
    """+100 on one token makes it the greedy answer's every token (the engine's tests check the bias
    against a reference)."""
    _, url = live
    forced = post(url, "/detokenize", {"tokens": [42] * 6}).json()["prompt"]
    common = {
        "max_tokens": 6,
        "temperature": 0,
        "logit_bias": {"42": 100},
        "extra_body": {"ignore_eos": True},
    }
    assert complete(prompt="The capital of", **common).choices[0].text == forced
    assert chat(messages=HELLO, **common).choices[0].message.content == forced


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"temperature": -1}, 400, "temperature"),
        ({"top_p": 1.5}, 400, "top_p"),
        ({"n": 0}, 400, "n"),
        ({"max_tokens": "ten"}, 400, "max_tokens"),
        ({"messages": []}, 400, "messages"),
        ({"messages": "hello"}, 400, "messages"),
        ({"max_tokens": 10_000}, 400, "max_tokens"),
        ({"n": 100}, 400, "n"),
        ({"timeout": -1}, 400, "timeout"),
        ({"logit_bias": {"5": 101}}, 400, "logit_bias"),
        ({"logit_bias": {"five": 1}}, 400, "logit_bias"),
        ({"logit_bias": {"99999999": 1}}, 400, "logit_bias"),
        ({"logit_bias": {str(t): 1 for t in range(301)}}, 400, "logit_bias"),
        ({"frobnicate": 1}, 400, "frobnicate"),
        ({"model": "gpt-17"}, 404, "model"),
    ],
)
def test_chat_errors_have_openai_shape(live, body, status, param):
    _, url = live
    response = post(url, "/v1/chat/completions", {"messages": HELLO, "max_tokens": 2} | body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"].startswith(param)


def test_context_errors_and_malformed_json(live):
    server, url = live
    response = post(url, "/v1/completions", {"prompt": "word " * 400})
    error = response.json()["error"]
    assert (
        response.status_code == 400
        and error["code"] == "context_length_exceeded"
        and "256" in error["message"]
    )
    response = httpx.post(
        f"{url}/v1/completions",
        content=b'{"prompt": "x"',
        headers={"Authorization": f"Bearer {KEY}", "content-type": "application/json"},
    )
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]
    missing = httpx.get(f"{url}/v1/nothing-here", headers={"Authorization": f"Bearer {KEY}"})
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    # RELIABILITY 6: a prompt of context - 1 tokens with max_tokens 1 gives one token
    ids = [5] * (server.config.max_length - 1)
    answer = post(url, "/v1/completions", {"prompt": ids, "max_tokens": 1, "ignore_eos": True}).json()
    assert answer["usage"]["completion_tokens"] == 1
    # RELIABILITY 5: without max_tokens, the answer may fill the room the context leaves
    answer = post(url, "/v1/completions", {"prompt": ids[:-5], "ignore_eos": True}).json()
    assert answer["usage"]["completion_tokens"] == 6 and answer["choices"][0]["finish_reason"] == "length"


def test_auth_rejects_and_generates_nothing(live):
    server, url = live
    generated = server.engine.tokens_generated
    body = {"messages": HELLO, "max_tokens": 4}
    for key in (None, "wrong-key", KEY + "x"):
        response = post(url, "/v1/chat/completions", body, key=key)
        assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
    assert post(url, "/instruct", {"prompt": "hi"}, key=None).status_code == 401
    assert httpx.get(f"{url}/metrics").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0).models.list()
    assert server.engine.tokens_generated == generated
    assert httpx.get(f"{url}/health").status_code == 200  # no key needed
    assert KEY not in httpx.get(f"{url}/status", headers={"Authorization": f"Bearer {KEY}"}).text


def test_tokenize_and_detokenize_round_trip(live):
    _, url = live
    tokens = post(url, "/tokenize", {"prompt": "Hello world! café 😀", "return_token_strs": True}).json()
    assert (
        tokens["count"] == len(tokens["tokens"]) == len(tokens["token_strs"])
        and tokens["max_model_len"] == 256
    )
    assert post(url, "/detokenize", {"tokens": tokens["tokens"]}).json() == {"prompt": "Hello world! café 😀"}
    assert post(url, "/tokenize", {}).status_code == 400
    assert post(url, "/detokenize", {"tokens": [10**6]}).json()["error"]["param"] == "tokens"


def test_stream_disconnect_aborts_the_request(live):
    server, url = live
    aborted = server.engine.stats()["requests_finished"].get("abort", 0)
    body = {"prompt": "Hello", "max_tokens": 200, "ignore_eos": True, "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers, timeout=30) as response:
        first = next(line for line in response.iter_lines() if line.startswith("data: "))
        assert json.loads(first[6:])["choices"][0]["finish_reason"] is None
    deadline = time.monotonic() + 5
    while server.engine.stats()["running_requests"]:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert server.engine.stats()["requests_finished"]["abort"] == aborted + 1


def test_an_error_chunk_is_500_or_an_error_event_then_done(live, monkeypatch):
    """How the chat route writes a request that ended in error (a real engine failure over HTTP is in
    test_hardening)."""
    server, url = live

    def failing_submit(request, loop=None):
        stream = OutputStream(request, loop)
        stream.put(GenerationChunk("", [], 0, "error", error="boom"))
        return stream

    monkeypatch.setattr(server, "submit", failing_submit)
    body = {"messages": HELLO, "max_tokens": 4}
    whole = post(url, "/v1/chat/completions", body)
    assert whole.status_code == 500 and "boom" in whole.json()["error"]["message"]
    streamed = post(url, "/v1/chat/completions", body | {"stream": True})
    events = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert json.loads(events[0])["error"]["type"] == "server_error" and events[1:] == ["[DONE]"]


def test_metrics_count_requests_tokens_and_latency(complete, live):
    _, url = live
    before = metric_values(url)
    long_prompt = "Hello, tell me about the sea and the ships on it " * 3  # over a page of 16 tokens
    answers = [complete(prompt=long_prompt, max_tokens=4, temperature=0) for _ in range(3)]
    post(url, "/v1/completions", {"prompt": "Hello"}, key="bad")
    after = metric_values(url)

    def grew(name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert grew("jaxserver_requests_total", endpoint="/v1/completions", status="200") == 3
    assert grew("jaxserver_requests_total", endpoint="/v1/completions", status="401") == 1
    assert grew("jaxserver_generation_tokens_total") == sum(a.usage.completion_tokens for a in answers)
    assert grew("jaxserver_prompt_tokens_total") == sum(a.usage.prompt_tokens for a in answers)
    assert grew("jaxserver_time_to_first_token_seconds_count") == 3
    assert grew("jaxserver_inter_token_latency_seconds_count") == sum(
        a.usage.completion_tokens - 1 for a in answers
    )
    assert after[("jaxserver_max_num_seqs", ())] == 8 and ("jaxserver_running_requests", ()) in after
    # The engine's own accounting: every prompt token computed once (padding computed on top) or found
    # in the cache (the same prompt again: its full pages before its last token), every token after the
    # first generated by a decode step; one request at a time, so one token per step.
    prompt_tokens = grew("jaxserver_engine_prompt_tokens_total")
    reused = grew("jaxserver_engine_prompt_tokens_reused_total")
    assert prompt_tokens + reused == sum(a.usage.prompt_tokens for a in answers)
    page = paged.PAGE_TOKENS
    assert reused == 2 * page * ((answers[0].usage.prompt_tokens - 1) // page)
    assert grew("jaxserver_engine_prompt_tokens_computed_total") >= prompt_tokens
    decoded = grew("jaxserver_engine_decode_tokens_total")
    assert decoded == sum(a.usage.completion_tokens - 1 for a in answers)
    assert grew("jaxserver_engine_decode_rows_computed_total") >= decoded
    assert grew("jaxserver_engine_decode_steps_total") == decoded
    assert (
        grew("jaxserver_engine_prefill_seconds_total") > 0
        and grew("jaxserver_engine_decode_seconds_total") > 0
    )


def test_health_and_cors_without_a_model():
    server = JAXServer(tiny.test_config(api_key=KEY, cors_origins=("http://app.example",)))
    http = TestClient(server.app)
    assert http.get("/health").status_code == 503
    preflight = http.options(
        "/v1/chat/completions",
        headers={"Origin": "http://app.example", "Access-Control-Request-Method": "POST"},
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "http://app.example"
    denied = http.get("/v1/models", headers={"Origin": "http://app.example"})
    assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == "http://app.example"
    down = http.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert down.status_code == 503 and down.json()["error"]["type"] == "service_unavailable"

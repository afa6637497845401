"""Hostile clients and a failing engine over HTTP (issue 22, docs/reliability.md): bodies too large or too
slow, headers a byte at a time, too many connections, unbounded stop strings and choices, what a 500 and
/health may say, an engine that really fails mid-stream and one that hangs. A `FakeServer` answers, so
tokens are known and nothing compiles."""

import json
import logging
import socket
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from jaxserver import JAXServer
from jaxserver.engine.engine import ENGINE_FAILED
from tests.fake_runner import FakeServer
from tests.live import served

LIMITS = {
    "max_body_bytes": 4096,
    "body_timeout_s": 1.0,
    "header_timeout_s": 1.0,
    "max_connections": 8,
    "max_n": 4,
    "max_stop_strings": 4,
    "max_stop_chars": 16,
    "max_num_seqs": 4,
    "max_waiting_requests": 12,  # one body may start (4 + 12) / 2 = 8 requests
}


@pytest.fixture(scope="module")
def url():
    with served(FakeServer.start(**LIMITS)) as base:
        yield base


def raw_connection(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def closed_within(conn: socket.socket, seconds: float) -> bool:
    """Whether the server closes `conn` within `seconds` (what it sent before closing is read and dropped)."""
    conn.settimeout(seconds)
    try:
        while conn.recv(4096):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


def test_a_chunked_body_is_counted_as_it_arrives_413(url):
    def chunks():
        for _ in range(64):  # 64 KiB, no Content-Length
            yield b"x" * 1024

    response = httpx.post(f"{url}/v1/completions", content=chunks(), timeout=10)
    assert response.status_code == 413
    assert "the limit is 4096" in response.json()["error"]["message"]
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200


def test_a_body_sent_too_slowly_gets_408(url):
    with raw_connection(url) as conn:
        started = time.monotonic()
        head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        conn.sendall(head + b"Content-Length: 200\r\n\r\n" + b'{"prompt": "')
        answer = b""
        while chunk := conn.recv(4096):  # the server closes the connection after its answer
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive within 1 s" in answer
        assert time.monotonic() - started < 3


def test_headers_sent_a_byte_at_a_time_or_never_are_cut_off(url):
    with raw_connection(url) as idle, raw_connection(url) as dribbling:
        started = time.monotonic()
        for byte in b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ":
            try:
                dribbling.sendall(bytes([byte]))
            except OSError:
                break  # closed by the server: what this test wants
            time.sleep(0.05)
        assert closed_within(dribbling, 3) and closed_within(idle, 1)
        assert time.monotonic() - started < 5


def test_connections_past_the_limit_get_503(url):
    idle = [raw_connection(url) for _ in range(LIMITS["max_connections"])]
    try:
        time.sleep(0.2)  # accepted by the server
        refused = httpx.get(f"{url}/health", timeout=10)
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
        assert "max_connections" in refused.json()["error"]["message"]
    finally:
        for conn in idle:
            conn.close()
    time.sleep(0.3)
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200


@pytest.mark.parametrize(
    ("extra", "param", "says"),
    [
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
        ({"stop": "x" * 17}, "stop", "at most 16 characters"),
        ({"n": 5}, "n", "at most 4 (max_n)"),
        ({"n": 3, "prompt": ["a", "b", "c"]}, "n", "the 8 requests one body may"),
    ],
)
def test_one_request_cannot_ask_for_unbounded_work(url, extra, param, says):
    body = {"prompt": "w", "max_tokens": 3} | extra
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=10)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and says in error["message"]


def test_within_the_bounds_the_same_request_runs(url):
    body = {"prompt": "w", "max_tokens": 3, "stop": ["a", "b", "c", "y"], "n": 4}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=10)
    assert response.status_code == 200 and [c["text"] for c in response.json()["choices"]] == ["x"] * 4


def test_every_answer_carries_a_request_id(url):
    mine = httpx.get(f"{url}/health", headers={"X-Request-Id": "client-42"}, timeout=10)
    assert mine.headers["x-request-id"] == "client-42"
    odd = httpx.get(f"{url}/nowhere", headers={"X-Request-Id": "no spaces\tallowed"}, timeout=10)
    assert odd.status_code == 404 and len(odd.headers["x-request-id"]) == 32


def test_a_500_names_its_request_id_and_nothing_internal(monkeypatch, caplog):
    """An unexpected error: a stable message with the request id (the log has the rest), and the
    connection stays usable for the client's next request."""
    server = FakeServer.start()

    def broken_status():
        raise RuntimeError("cannot read /etc/secret-path")

    monkeypatch.setattr(server, "status", broken_status)
    with (
        caplog.at_level(logging.ERROR),
        served(server) as url,
        httpx.Client(base_url=url, timeout=10) as client,
    ):
        response = client.get("/status")
        assert response.status_code == 500
        message, rid = response.json()["error"]["message"], response.headers["x-request-id"]
        assert "secret" not in message and "RuntimeError" not in message and f"request id {rid}" in message
        assert client.get("/health").status_code == 200  # on the same connection
    assert f"request {rid} failed" in caplog.text and "secret-path" in caplog.text  # the log has it


def test_health_after_a_failed_load_says_so_without_the_path(tmp_path):
    server = JAXServer({"warm_up": False, "compilation_cache_dir": None})
    with pytest.raises(Exception, match="does not exist"):
        server.load_model(tmp_path / "private-model-dir")
    with TestClient(server.app) as client:
        for path in ("/health", "/status", "/v1/models"):
            assert "private-model-dir" not in client.get(path).text
        health = client.get("/health")
    assert health.status_code == 503 and "could not be loaded" in health.json()["error"]["message"]


def sse_events(response: httpx.Response):
    for line in response.iter_lines():
        if line.startswith("data: "):
            yield line[len("data: ") :]


def test_an_engine_that_fails_mid_stream_ends_every_request_and_reports_down():
    """The engine really fails (its runner raises in the loop): the stream ends with an error event
    (a stable message and the request id) and [DONE], later requests get 500, /health 503, and the
    failure callback (what makes `jaxserver serve` exit) hears the cause."""
    server = FakeServer.start(max_length=1024)
    causes = []
    server.on_engine_failure = causes.append
    with served(server) as url:
        body = {"prompt": " ", "max_tokens": 1000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as response:
            events = sse_events(response)
            first = json.loads(next(events))
            assert first["choices"][0]["finish_reason"] is None, first

            def broken(*args, **kwargs):
                raise RuntimeError("the device is on fire")

            server.runner.decode = server.runner.step = broken
            rest = list(events)
            rid = response.headers["x-request-id"]
        assert rest[-1] == "[DONE]"
        error = json.loads(rest[-2])["error"]
        assert error["message"] == f"{ENGINE_FAILED} (request id {rid})" and error["type"] == "server_error"
        later = httpx.post(f"{url}/v1/completions", json={"prompt": "w"}, timeout=10)
        assert later.status_code == 500 and "fire" not in later.text
        health = httpx.get(f"{url}/health", timeout=10)
        assert health.status_code == 503 and "fire" not in health.text
    assert causes == ["RuntimeError: the device is on fire"]


def test_a_hung_engine_turns_health_503_until_it_moves_again():
    server = FakeServer.start(engine_stall_timeout_s=0.5)
    release = threading.Event()
    decode = server.runner.decode

    def hanging_decode(*args, **kwargs):
        release.wait(20)
        return decode(*args, **kwargs)

    server.runner.decode = hanging_decode
    with served(server) as url:
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        body = {"prompt": "w"}
        waiting = threading.Thread(target=httpx.post, args=(f"{url}/v1/completions",), kwargs={"json": body})
        waiting.start()
        deadline = time.monotonic() + 10
        while server.engine.stats()["running_requests"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(1.0)  # twice the bound
        hung = httpx.get(f"{url}/health", timeout=10)
        assert hung.status_code == 503 and "has not finished a step" in hung.json()["error"]["message"]
        release.set()
        waiting.join(10)
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200


class RoomyFakeServer(FakeServer):
    pages = 64 * 130  # room for 64 sequences of 2048 tokens


def test_a_cancellation_flood_is_aborted_and_the_next_request_served_at_once():
    """shared/RELIABILITY.md #9: 200 long requests whose clients give up after 0.5 s are all aborted
    (none runs on), every slot and page comes back, and a fresh request is answered within seconds."""
    import asyncio

    server = RoomyFakeServer.start(max_length=2048, max_num_seqs=64, max_waiting_requests=256)
    decode = server.runner.decode

    def slow_decode(*args, **kwargs):  # about as slow as a real model, so the requests outlive 0.5 s
        time.sleep(0.02)
        return decode(*args, **kwargs)

    server.runner.decode = slow_decode
    body = {"prompt": " ", "max_tokens": 2000, "ignore_eos": True}

    async def flood(url: str) -> list[str]:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:

            async def give_up(i: int) -> str:
                request = client.post("/v1/completions", json=body | {"stream": i % 2 == 0})
                try:
                    response = await asyncio.wait_for(request, 0.5)  # streamed or not: 0.5 s in all
                    return f"answered {response.status_code}"
                except TimeoutError:
                    return "gave up"

            return await asyncio.gather(*(give_up(i) for i in range(200)))

    with served(server) as url:
        outcomes = asyncio.run(flood(url))
        assert outcomes.count("gave up") == 200, sorted(set(outcomes))
        deadline = time.monotonic() + 10
        while (stats := server.engine.stats())["running_requests"] or stats["waiting_requests"]:
            assert time.monotonic() < deadline, stats
            time.sleep(0.05)
        started = time.monotonic()
        fresh = httpx.post(f"{url}/v1/completions", json={"prompt": "w", "max_tokens": 3}, timeout=10)
        assert fresh.status_code == 200 and time.monotonic() - started < 3
    stats = server.engine.stats()
    assert stats["requests_finished"]["abort"] == 200 and set(stats["requests_finished"]) <= {
        "abort",
        "length",
    }
    pool = stats["kv_cache"]
    assert pool["pages_free"] == pool["pages_total"]  # cached pages count as free: none is held


def test_a_prompt_that_cannot_fit_is_refused_before_it_is_tokenized(monkeypatch):
    """7 MiB of prompt (under the body limit) for a context of 128 tokens: 400 at once, from its length in
    characters, without the tokenizer reading it."""
    server = FakeServer.start()
    encoded = []
    encode = server.tokenizer.encode
    monkeypatch.setattr(server.tokenizer, "encode", lambda text: encoded.append(len(text)) or encode(text))
    with served(server) as url:
        for path, body in (
            ("/v1/completions", {"prompt": "x" * 7 * 2**20}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 7 * 2**20}]}),
            ("/instruct", {"prompt": "x" * 7 * 2**20}),
        ):
            response = httpx.post(f"{url}{path}", json=body, timeout=30)
            assert response.status_code == 400, (path, response.text)
            error = response.json()["error"]
            assert error["code"] == "context_length_exceeded" and "characters" in error["message"]
        assert max(encoded, default=0) < 2**20
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "w"}, timeout=10).json()["choices"]


def test_tokenizing_does_not_stall_the_event_loop(monkeypatch):
    """A prompt that takes a second to tokenize leaves /health answering at once."""
    server = FakeServer.start()
    encode = server.tokenizer.encode

    def slow_encode(text: str) -> list[int]:
        time.sleep(1.0)
        return encode(text)

    monkeypatch.setattr(server.tokenizer, "encode", slow_encode)
    with served(server) as url:
        slow = threading.Thread(
            target=httpx.post, args=(f"{url}/v1/completions",), kwargs={"json": {"prompt": "w"}}
        )
        slow.start()
        time.sleep(0.2)  # the request is being tokenized
        started = time.monotonic()
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        assert time.monotonic() - started < 0.3
        slow.join(10)

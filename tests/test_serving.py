"""A live HTTP server (uvicorn on 127.0.0.1) over a tiny model: disconnects, overload and cancellation
floods, as shared/RELIABILITY.md describes them."""

import json
import os
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from jaxserver.launch import free_port, start_server
from tests import tiny
from tests.live import engine_stats, serving, wait_until_idle

LONG = {"prompt": "Tell me everything.", "max_new_tokens": 4000, "ignore_eos": True, "greedy": True}


@pytest.fixture(scope="module")
def live(tiny_llama_dir):
    with serving(
        tiny_llama_dir,
        tiny.test_config(
            max_length=4096, max_batch_size=2, max_waiting_requests=1, max_compile_tokens=4, warm_up=True
        ),
    ) as served:
        yield served


def test_disconnect_mid_stream_aborts_and_frees_the_slot(live):
    _, url = live
    aborted = engine_stats(url)["requests_finished"].get("abort", 0)
    with requests.post(f"{url}/instruct", json=LONG | {"stream": True}, stream=True, timeout=30) as response:
        first = next(line for line in response.iter_lines() if line.startswith(b"data: "))
        assert b'"finish_reason": null' in first
    wait_until_idle(url)
    assert engine_stats(url)["requests_finished"]["abort"] == aborted + 1


def test_disconnect_during_a_non_streaming_request_aborts_it(live):
    _, url = live
    aborted = engine_stats(url)["requests_finished"].get("abort", 0)
    with pytest.raises(requests.ReadTimeout):
        requests.post(f"{url}/instruct", json=LONG, timeout=0.5)
    wait_until_idle(url)
    assert engine_stats(url)["requests_finished"]["abort"] == aborted + 1


def test_overload_answers_503_at_once_and_admitted_requests_finish(live):
    _, url = live
    with ThreadPoolExecutor(3) as pool:
        admitted = [
            pool.submit(requests.post, f"{url}/instruct", json=LONG | {"max_new_tokens": 300}, timeout=60)
            for _ in range(3)
        ]  # two slots and one waiting place
        deadline = time.monotonic() + 10
        while (engine_stats(url)["running_requests"], engine_stats(url)["waiting_requests"]) != (2, 1):
            assert time.monotonic() < deadline, engine_stats(url)
            time.sleep(0.01)
        started = time.monotonic()
        rejected = requests.post(f"{url}/instruct", json={"prompt": "hi"}, timeout=10)
        assert time.monotonic() - started < 1.0
        assert rejected.status_code == 503 and rejected.headers["Retry-After"] == "1"
        assert rejected.json()["error"]["type"] == "overloaded"
        assert [f.result().json()["tokens_used"] for f in admitted] == [300, 300, 300]


def test_bench_tool_reports_a_sweep(live, tmp_path):
    from jaxserver.cli import main

    _, url = live
    out, png = tmp_path / "bench.json", tmp_path / "sweep.png"
    argv = [
        "bench",
        "--url",
        url,
        "--num-requests",
        "6",
        "--sweep",
        "1,3",
        "--input-len",
        "20",
        "--output-len",
        "12",
        "--temperature",
        "0.8",
        "--json",
        str(out),
        "--plot",
        str(png),
    ]
    assert main(argv) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["concurrency"] for r in rows] == [1, 3]
    for row in rows:
        assert row["completed"] == 6 and row["failed"] == 0
        assert row["output_tokens_per_s"] > 0 and 0 < row["ttft_s"]["p50"] <= row["e2e_latency_s"]["p50"]
        assert row["itl_s"]["p99"] >= row["itl_s"]["p50"] > 0
        # The engine's profile over the level, from /status: a share of the wall time, and at concurrency 1
        # never more than one row generating per step.
        engine = row["engine"]
        assert 0 < engine["prefill_share"] + engine["decode_share"] <= 1
        assert (
            0
            < engine["decode_rows_per_step"]
            <= min(row["concurrency"], engine["decode_rows_computed_per_step"])
        )
    assert rows[0]["engine"]["decode_rows_per_step"] == 1
    # The second level sends the first one's prompts again: their full pages are in the prefix cache.
    assert 0.5 < rows[1]["engine"]["prompt_reused_share"] < 1
    assert png.stat().st_size > 10_000


@pytest.fixture
def served_tiny(tiny_llama_dir, tmp_path):
    """`jaxserver serve` in its own process over the tiny model, with a 1-second drain and one token
    per decode call (slow on purpose)."""
    flags = [
        "--model",
        str(tiny_llama_dir),
        "--max-length",
        "4096",
        "--max-compile-tokens",
        "1",
        "--drain-timeout-s",
        "1",
        "--compilation-cache-dir",
        str(tmp_path / "xla"),
    ]
    server = start_server(flags, tmp_path / "serve.log", timeout_s=300, env=os.environ | {"XLA_FLAGS": ""})
    yield server.process, server.url
    server.process.kill()
    assert "Traceback" not in server.log_tail(10**6)


def stream_events(url: str, body: dict, started: threading.Event, events: list) -> None:
    with requests.post(f"{url}/instruct", json=body | {"stream": True}, stream=True, timeout=60) as response:
        for line in response.iter_lines(decode_unicode=True):
            if line.startswith("data: "):
                events.append(line[len("data: ") :])
                started.set()


@pytest.mark.parametrize(("new_tokens", "reason"), [(8, "length"), (4000, "abort")])
def test_sigterm_drains_then_aborts_and_exits_cleanly(served_tiny, new_tokens, reason):
    """Running requests may finish within the drain timeout (1 s); the rest end with finish_reason
    "abort" and [DONE]. While a drain lasts the server still listens: a new request and /health get 503
    (so that a load balancer moves on) rather than a refused connection. The process exits without an
    error, within the drain timeout and a few seconds."""
    process, url = served_tiny
    started, events = threading.Event(), []
    body = LONG | {"max_new_tokens": new_tokens}
    client = threading.Thread(target=stream_events, args=(url, body, started, events))
    client.start()
    assert started.wait(30)
    process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    time.sleep(0.2)
    if reason == "abort":  # the drain lasts its full second
        refused = requests.post(f"{url}/instruct", json={"prompt": "hi"}, timeout=5)
        assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
        assert requests.get(f"{url}/health", timeout=5).status_code == 503
    else:  # finished at once: the server may have stopped listening already
        with pytest.raises(requests.RequestException):
            requests.post(f"{url}/instruct", json={"prompt": "hi"}, timeout=5).raise_for_status()
    client.join(timeout=30)
    # uvicorn re-raises the signal once it has shut down, so the status is the conventional -SIGTERM.
    assert process.wait(timeout=30) in (0, -signal.SIGTERM)
    assert time.monotonic() - signalled < 1 + 5
    assert events[-1] == "[DONE]" and json.loads(events[-2])["finish_reason"] == reason


def test_serve_logs_its_own_progress_and_nothing_foreign(tiny_llama_dir, tmp_path):
    """Without JAX_PLATFORMS, JAX probes for a TPU and logs the failure at INFO, which reads as an error:
    `jaxserver serve` shows its own progress, uvicorn's lines and warnings only."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"} | {"XLA_FLAGS": ""}
    flags = ["--model", str(tiny_llama_dir), "--max-length", "256", "--warm-up", "false", "--no-ui"]
    server = start_server(flags, tmp_path / "serve.log", timeout_s=300, env=env)
    assert server.stop() in (0, -signal.SIGTERM)
    lines = server.log_path.read_text().splitlines()
    assert any(" INFO jaxserver: ready in " in line for line in lines)
    ours = re.compile(r"\S+ \S+ (INFO|WARNING|ERROR) jaxserver[.:]|INFO: ")
    assert [line for line in lines if not ours.match(line)] == []


def test_serve_exits_with_an_error_when_the_model_cannot_load(tmp_path):
    """The model loads while the app is built; a load that fails stops the server, whichever is first."""
    import subprocess
    import sys

    missing = tmp_path / "no-model-here"
    command = [
        sys.executable,
        "-m",
        "jaxserver.cli",
        "serve",
        "--port",
        str(free_port()),
        "--model",
        str(missing),
        "--no-ui",
    ]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert finished.returncode == 1
    assert f"could not load the model: model path {missing} does not exist" in finished.stderr


# `jaxserver serve` whose runner raises at its first step: an engine failure nothing stubs out.
FAILING_SERVE = """
import sys
from jaxserver import cli
from jaxserver.engine.runner import Runner

def failing_step(self, *args, **kwargs):
    raise RuntimeError("injected failure at /private/detail")

Runner.step = failing_step
sys.exit(cli.main(sys.argv[1:]))
"""


def test_serve_exits_1_after_the_engine_fails(tiny_llama_dir, tmp_path):
    """A failed engine is not left serving 500s: the request in flight gets the error, /health turns 503
    without the cause, and the process exits 1 within a few seconds for its supervisor to restart."""
    import subprocess
    import sys

    port = free_port()
    flags = ["--model", str(tiny_llama_dir), "--max-length", "256", "--warm-up", "false", "--no-ui"]
    command = [sys.executable, "-c", FAILING_SERVE, "serve", "--port", str(port), *flags]
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=os.environ | {"XLA_FLAGS": ""}
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert time.monotonic() < deadline and process.poll() is None, log.read_text()
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.2)
        answer = requests.post(f"{url}/instruct", json={"prompt": "hi", "max_new_tokens": 4}, timeout=30)
        failed_at = time.monotonic()
        assert answer.status_code == 500 and "private" not in answer.text
        health = requests.get(f"{url}/health", timeout=5)
        assert health.status_code == 503 and "private" not in health.text
        assert process.wait(timeout=15) == 1
        assert time.monotonic() - failed_at < 10
    finally:
        process.kill()
    assert "injected failure at /private/detail" in log.read_text()  # the cause is in the log

"""Two processes of 4 CPU devices each, on 127.0.0.1, serving one model (docs/multihost.md): the same
greedy answers as one process of 8 devices, streaming and cancellation across processes, and failures
that end the group within their bounds."""

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from jaxserver.engine.engine import ENGINE_FAILED
from jaxserver.launch import free_port, start_group, start_server

PROMPTS = ["Hello there", "The capital of France is", "1 2 3 4 5", "Once upon a time"]
HEARTBEAT_S = 3


def tiny_flags(model_dir, mesh: str, tmp_path) -> list[str]:
    return [
        "--model",
        str(model_dir),
        "--max-length",
        "512",
        "--max-compile-tokens",
        "8",
        "--max-num-seqs",
        "8",
        "--mesh-axes-shape",
        mesh,
        "--no-ui",
        "--heartbeat-timeout-s",
        str(HEARTBEAT_S),
        "--compilation-cache-dir",
        str(tmp_path / "xla"),
    ]


def greedy_answers(url: str, max_tokens: int = 24) -> list[str]:
    """Each prompt's greedy completion, all sent at once (so they are batched together)."""

    def complete(prompt: str) -> str:
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
        response = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["text"]

    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        return list(pool.map(complete, PROMPTS))


def stream_text(url: str, body: dict, events_wanted: int | None = None) -> tuple[str, list[dict]]:
    """The streamed text and events of a completion; with `events_wanted`, the stream is closed after
    that many events (the client goes away)."""
    text, events = "", []
    with httpx.stream("POST", f"{url}/v1/completions", json=body | {"stream": True}, timeout=180) as response:
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                events.append({"done": True})
                break
            event = json.loads(line[len("data: ") :])
            events.append(event)
            text += "".join(choice["text"] for choice in event.get("choices", []))
            if events_wanted is not None and len(events) >= events_wanted:
                break
    return text, events


@pytest.fixture(scope="module", params=["1,-1,1", "1,1,-1"], ids=["fsdp-over-processes", "model-axis"])
def mesh(request):
    return request.param


@pytest.fixture(scope="module")
def one_process_answers(tiny_llama_dir, mesh, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("one-process")
    env = os.environ | {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    server = start_server(tiny_flags(tiny_llama_dir, mesh, tmp), tmp / "serve.log", env=env)
    try:
        return greedy_answers(server.url)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def group(tiny_llama_dir, mesh, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("group")
    members = start_group(tiny_flags(tiny_llama_dir, mesh, tmp), tmp)
    yield members
    for member in members:
        if member.process.poll() is None:
            member.process.kill()


def test_group_answers_as_one_process_of_as_many_devices(group, one_process_answers):
    leader, worker = group
    assert greedy_answers(leader.url) == one_process_answers
    status = httpx.get(f"{leader.url}/status", timeout=10).json()
    assert len(status["devices"]) == 8
    assert httpx.get(f"{worker.url}/health", timeout=10).json() == {"status": "ok", "role": "worker"}
    assert httpx.post(f"{worker.url}/v1/completions", json={"prompt": "x"}, timeout=10).status_code == 404


def test_streams_and_cancellation_across_processes(group, one_process_answers):
    leader, _ = group
    body = {"prompt": PROMPTS[0], "max_tokens": 24, "temperature": 0}
    text, events = stream_text(leader.url, body)
    assert text == one_process_answers[0] and events[-1] == {"done": True}
    long = {"prompt": PROMPTS[1], "max_tokens": 400, "temperature": 0, "ignore_eos": True}
    _, events = stream_text(leader.url, long, events_wanted=3)  # the client leaves early
    assert len(events) == 3
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        engine = httpx.get(f"{leader.url}/status", timeout=10).json()["engine"]
        if engine["requests_finished"].get("abort") and not engine["running_requests"]:
            break
        time.sleep(0.2)
    assert engine["requests_finished"].get("abort") == 1 and engine["running_requests"] == 0
    assert greedy_answers(leader.url) == one_process_answers  # the group serves on, unchanged


@pytest.fixture
def fresh_group(tiny_llama_dir, tmp_path):
    """A group of its own for a test that ends it; whatever is left of it is killed after."""
    members = start_group(tiny_flags(tiny_llama_dir, "1,-1,1", tmp_path), tmp_path)
    yield members
    for member in members:
        if member.process.poll() is None:
            member.process.kill()


# A killed worker fails process 0's next collective at once; a stopped one (alive, answering nothing) is
# caught by its missing heartbeat.
WORKER_FAULTS = {
    "killed": (signal.SIGKILL, ("Gloo", "process group failed")),
    "stopped": (signal.SIGSTOP, (f"process 1 sent no heartbeat for {HEARTBEAT_S} s",)),
}


@pytest.mark.parametrize("fault", list(WORKER_FAULTS))
def test_a_failed_worker_ends_the_stream_and_the_group(fresh_group, fault):
    leader, worker = fresh_group
    sent, expected = WORKER_FAULTS[fault]
    body = {"prompt": PROMPTS[0], "max_tokens": 480, "temperature": 0, "ignore_eos": True, "stream": True}
    events, failed_at = [], None
    with httpx.stream("POST", f"{leader.url}/v1/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line)
                if failed_at is None:
                    worker.process.send_signal(sent)
                    failed_at = time.monotonic()
    ended_after = time.monotonic() - failed_at
    health = httpx.get(f"{leader.url}/health", timeout=10)  # before process 0's exit grace ends
    assert events[-1] == "data: [DONE]"
    message = json.loads(events[-2][len("data: ") :])["error"]["message"]
    assert message.startswith(ENGINE_FAILED), message  # the reason is for the log, not the client
    assert ended_after < HEARTBEAT_S + 5
    assert health.status_code == 503 and health.json()["error"]["message"]
    assert leader.process.wait(timeout=HEARTBEAT_S + 10) == 1
    log = leader.log_path.read_text(errors="replace")
    assert any(text in log for text in expected), log[-3000:]


def test_workers_exit_when_process_0_dies(fresh_group):
    leader, worker = fresh_group
    leader.process.kill()
    assert worker.process.wait(timeout=HEARTBEAT_S + 10) != 0


def test_sigterm_to_a_worker_fails_the_group(fresh_group):
    leader, worker = fresh_group
    worker.process.terminate()
    assert worker.process.wait(timeout=10) == -signal.SIGTERM
    assert leader.process.wait(timeout=HEARTBEAT_S + 10) == 1


def test_sigterm_to_process_0_stops_the_group_cleanly(fresh_group):
    leader, worker = fresh_group
    assert greedy_answers(leader.url, max_tokens=4)
    assert leader.stop(timeout_s=60) in (0, -signal.SIGTERM)  # as a server of its own
    assert worker.process.wait(timeout=30) == 0


def run_alone(flags: list[str], timeout_s: float) -> subprocess.CompletedProcess:
    env = os.environ | {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    command = [sys.executable, "-m", "jaxserver.cli", "serve", "--host", "127.0.0.1", *flags]
    return subprocess.run(command, check=False, capture_output=True, text=True, timeout=timeout_s, env=env)


def test_an_unreachable_coordinator_fails_within_its_timeout(tiny_llama_dir):
    flags = ["--model", str(tiny_llama_dir), "--port", str(free_port()), "--no-ui"]
    group = ["--coordinator-address", f"127.0.0.1:{free_port()}", "--num-processes", "2"]
    started = time.monotonic()
    done = run_alone([*flags, *group, "--process-id", "1", "--distributed-timeout-s", "3"], timeout_s=60)
    assert done.returncode == 2
    assert time.monotonic() - started < 30
    assert "did not form within 3 s" in done.stderr and "--coordinator-address" in done.stderr


def test_a_bad_coordinator_address_is_refused_at_once():
    done = run_alone(["--num-processes", "2", "--coordinator-address", "nowhere"], timeout_s=60)
    assert done.returncode == 2 and "coordinator_address must be HOST:PORT" in done.stderr


def test_settings_that_differ_between_processes_are_named(tiny_llama_dir, tmp_path):
    flags = tiny_flags(tiny_llama_dir, "1,-1,1", tmp_path)
    group = ["--coordinator-address", f"127.0.0.1:{free_port()}", "--num-processes", "2"]
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jaxserver.cli",
            "serve",
            "--port",
            str(free_port()),
            *flags,
            *group,
            "--process-id",
            "1",
            "--max-num-seqs",
            "4",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=os.environ | {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
    )
    leader = run_alone([*flags, "--port", str(free_port()), *group, "--process-id", "0"], timeout_s=120)
    worker_log, _ = worker.communicate(timeout=60)
    assert worker.returncode == 1 and leader.returncode == 1
    for log in (worker_log, leader.stderr):
        assert "--max-num-seqs 4 here, 8 on process 0" in log


@pytest.mark.e2e
def test_smollm2_answers_as_one_process(tmp_path):
    """The default model split over two processes (weights' embedding axis across them) answers as one
    process of 8 devices does."""
    flags = [
        "--max-length",
        "256",
        "--max-num-seqs",
        "4",
        "--mesh-axes-shape",
        "1,-1,1",
        "--no-ui",
        "--warm-up",
        "false",
        "--compilation-cache-dir",
        str(tmp_path / "xla"),
    ]
    body = {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
    env = os.environ | {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    one = start_server(flags, tmp_path / "one.log", env=env, timeout_s=900)
    try:
        alone = httpx.post(f"{one.url}/v1/completions", json=body, timeout=600).json()["choices"][0]["text"]
    finally:
        one.stop()
    members = start_group(flags, tmp_path, timeout_s=900)
    try:
        grouped = httpx.post(f"{members[0].url}/v1/completions", json=body, timeout=600).json()
        assert grouped["choices"][0]["text"] == alone and alone.strip()
    finally:
        for member in members:
            member.process.kill()

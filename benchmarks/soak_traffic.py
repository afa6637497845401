"""The soak's traffic (benchmarks/soak.py): requests drawn from a seeded RNG, each sent (and retried after
an overload's Retry-After) and its reply classed as `complete`, `error_body`, `disconnected` or `lost`."""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import dataclass, field

import httpx

COMPLETIONS, CHAT, INSTRUCT = "/v1/completions", "/v1/chat/completions", "/instruct"
CLIENT_TIMEOUT_S = 120.0  # a client that does not mean to leave gives up (and counts the request lost) here
MAX_RETRIES = 5  # of a 503 with Retry-After
# Words the tiny model's tokenizer was trained on (tests/tiny.py), so prompts stay a few tokens per word.
WORDS = (
    "the capital of France is Paris Germany Berlin hello world how are you today I am fine thank numbers "
    "like 12345 and 67890 appear here with café naïve emoji too def add a b return"
).split()
STOPS = ["the", "is", "\n", "Paris", "you", "a", "!", "."]
SYSTEMS = [  # shared starts of chat prompts, so the prefix cache holds and shares pages
    "You are a helpful assistant. " * 8,
    "Answer in one short sentence about the capital of France and Germany. " * 4,
    "",
]
INVALID = {  # bodies the server must refuse with the JSON error body
    "openai": [{"max_tokens": 100_000}, {"temperature": 3.0}, {"n": 0}],
    "seed": [{"max_new_tokens": 100_000}, {"max_new_tokens": 0}, {"temperature": -1.0}],
}


@dataclass
class Plan:
    """One request as drawn: where, what, and whether (and how) its client leaves early."""

    index: int
    route: str
    body: dict
    choices: int  # finish reasons a full answer carries
    leave: str | None = None  # "before_headers" | "mid_stream" | "client_timeout"
    leave_after_s: float = 0.0
    leave_after_events: int = 0
    invalid: bool = False


@dataclass
class Reply:
    kind: str  # "complete" | "error_body" | "disconnected" | "lost"
    status: int | None = None
    detail: str = ""
    tokens: int = 0
    retry_after_s: float | None = None
    server_error: bool = False  # a 5xx other than overload, or an error event in a 200 stream
    finish_reasons: list[str] = field(default_factory=list)  # of a complete answer's choices


@dataclass
class Outcome:
    plan: Plan
    reply: Reply
    retries: int
    latency_s: float


# --- drawing the traffic ---------------------------------------------------------------------------------


def prompt_text(rng: random.Random, most_words: int = 150) -> str:
    words = int(math.exp(rng.uniform(math.log(2), math.log(most_words))))  # log-uniform: mostly short
    return " ".join(rng.choice(WORDS) for _ in range(words))


def sampling(rng: random.Random, seed_route: bool) -> dict:
    if rng.random() < 0.5:
        return {"greedy": True} if seed_route else {"temperature": 0.0}
    return {"temperature": 0.8, "seed": rng.randrange(2**31)}


def chat_messages(rng: random.Random) -> list[dict]:
    system = rng.choice(SYSTEMS)
    messages = [{"role": "system", "content": system}] if system else []
    for _ in range(rng.randint(0, 2)):  # short earlier turns, so that the whole stays within ~400 tokens
        user, assistant = prompt_text(rng, 20), prompt_text(rng, 20)
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return [*messages, {"role": "user", "content": prompt_text(rng)}]


def openai_body(rng: random.Random, route: str, stream: bool) -> tuple[dict, int]:
    body: dict = {"max_tokens": rng.randint(1, 64), "stream": stream, **sampling(rng, False)}
    if route == COMPLETIONS:
        body["prompt"] = prompt_text(rng)
    else:
        body["messages"] = chat_messages(rng)
    if rng.random() < 0.2:
        body["stop"] = rng.sample(STOPS, rng.randint(1, 4))
    if rng.random() < 0.1:
        body["n"] = 2
    if stream:
        body["stream_options"] = {"include_usage": True}  # the usage chunk tells the tokens generated
    return body, body.get("n", 1)


def draw_plan(rng: random.Random, index: int, disconnect_share: float, invalid_share: float) -> Plan:
    route = rng.choices([COMPLETIONS, CHAT, INSTRUCT], weights=[45, 45, 10])[0]
    leave = None
    if rng.random() < disconnect_share:
        leave = rng.choice(["before_headers", "mid_stream", "client_timeout"])
    stream = leave == "mid_stream" or (leave != "client_timeout" and rng.random() < 0.5)
    if route == INSTRUCT:
        body = {"prompt": prompt_text(rng), "max_new_tokens": rng.randint(1, 64), "stream": stream}
        body, choices = body | sampling(rng, True), 1
    else:
        body, choices = openai_body(rng, route, stream)
    plan = Plan(index, route, body, choices, leave)
    plan.leave_after_s = rng.uniform(0.005, 0.1) if leave == "before_headers" else rng.uniform(0.05, 1.0)
    plan.leave_after_events = rng.randint(1, 8)
    if rng.random() < invalid_share:
        plan.invalid = True
        plan.body |= rng.choice(INVALID["seed" if route == INSTRUCT else "openai"])
    return plan


# --- one request -----------------------------------------------------------------------------------------


def error_reply(status: int, headers: httpx.Headers, body: object) -> Reply:
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict) or "message" not in error:
        return Reply("lost", status, f"{status} without the JSON error body")
    retry = headers.get("retry-after", "") if status == 503 else ""  # overload: the client may come back
    reply = Reply("error_body", status, f"{error.get('type')}: {str(error['message'])[:160]}")
    reply.retry_after_s = float(retry) if retry.isdigit() else None
    reply.server_error = status >= 500 and reply.retry_after_s is None
    return reply


def whole_reply(plan: Plan, status: int, headers: httpx.Headers, raw: bytes) -> Reply:
    """A non-streamed answer (or any error answer)."""
    try:
        body = json.loads(raw)
    except ValueError:
        return Reply("lost", status, f"{status} with a body that is not JSON")
    if status >= 400:
        return error_reply(status, headers, body)
    if status != 200 or not isinstance(body, dict):
        return Reply("lost", status, "not a 200 JSON object")
    if plan.route == INSTRUCT:
        if isinstance(body.get("response"), str) and isinstance(body.get("tokens_used"), int):
            return Reply("complete", status, tokens=body["tokens_used"])  # the seed's carries no reason
        return Reply("lost", status, "a seed answer without response or tokens_used")
    reasons = [c.get("finish_reason") for c in body.get("choices") or [] if isinstance(c, dict)]
    if len(reasons) == plan.choices and all(reasons):
        tokens = (body.get("usage") or {}).get("completion_tokens", 0)
        return Reply("complete", status, tokens=tokens, finish_reasons=reasons)
    return Reply("lost", status, "an answer without a finish_reason for every choice")


async def stream_reply(plan: Plan, response: httpx.Response) -> Reply:
    """A 200 event stream: complete once `[DONE]` came after a finish reason for every choice."""
    finished: dict[int, str] = {}  # choice index -> its finish reason
    tokens = events = 0
    done = False
    async for line in response.aiter_lines():
        if not line.startswith("data: "):
            continue
        data = line.removeprefix("data: ")
        if done:
            return Reply("lost", 200, "data after [DONE]")
        if data == "[DONE]":
            done = True
            continue
        try:
            event = json.loads(data)
        except ValueError:
            event = None
        if not isinstance(event, dict):
            return Reply("lost", 200, "an event that is not a JSON object")
        if "error" in event:
            return Reply("error_body", 200, "an error event in the stream", server_error=True)
        events += 1
        if plan.route == INSTRUCT:
            finished |= {0: event["finish_reason"]} if event.get("finish_reason") else {}
            tokens = event.get("tokens_used", tokens)
        else:
            finished |= {
                c["index"]: c["finish_reason"] for c in event.get("choices") or [] if c.get("finish_reason")
            }
            tokens = (event.get("usage") or {}).get("completion_tokens", tokens)
        if plan.leave == "mid_stream" and events >= plan.leave_after_events:
            return Reply("disconnected", 200, "left mid-stream")
    if done and len(finished) == plan.choices:
        return Reply("complete", 200, tokens=tokens, finish_reasons=list(finished.values()))
    return Reply("lost", 200, "stream ended without [DONE]" if not done else "[DONE] before every finish")


async def attempt(client: httpx.AsyncClient, url: str, plan: Plan) -> Reply:
    timeout = plan.leave_after_s if plan.leave == "client_timeout" else CLIENT_TIMEOUT_S
    request = client.build_request("POST", url + plan.route, json=plan.body, timeout=timeout)
    try:
        if plan.leave == "before_headers":
            response = await asyncio.wait_for(client.send(request, stream=True), plan.leave_after_s)
            await response.aclose()  # the headers came first: leave before reading any of the body
            return Reply("disconnected", response.status_code, "left after the headers")
        response = await client.send(request, stream=True)
        try:
            if response.status_code == 200 and plan.body["stream"]:
                return await stream_reply(plan, response)
            return whole_reply(plan, response.status_code, response.headers, await response.aread())
        finally:
            await response.aclose()
    except (TimeoutError, httpx.TimeoutException) as exc:
        if plan.leave in ("before_headers", "client_timeout"):
            return Reply("disconnected", None, "left before the answer")
        return Reply("lost", None, f"no answer within {CLIENT_TIMEOUT_S} s ({type(exc).__name__})")
    except httpx.HTTPError as exc:
        return Reply("lost", None, f"{type(exc).__name__}: {exc}")


async def send(client: httpx.AsyncClient, url: str, plan: Plan) -> Outcome:
    """`plan` until it ends other than by overload (503 with Retry-After), at most MAX_RETRIES retries."""
    started = time.monotonic()
    retries = 0
    while True:
        try:
            reply = await asyncio.wait_for(attempt(client, url, plan), CLIENT_TIMEOUT_S + 5)
        except TimeoutError:
            reply = Reply("lost", None, f"no answer within {CLIENT_TIMEOUT_S} s")
        if reply.retry_after_s is None or retries == MAX_RETRIES:
            return Outcome(plan, reply, retries, time.monotonic() - started)
        retries += 1
        await asyncio.sleep(min(reply.retry_after_s, 10.0))


async def run_load(url: str, plans: list[Plan], concurrency: int, progress: bool) -> list[Outcome]:
    """Every plan, `concurrency` at a time, each worker taking the next plan as soon as it is free."""
    outcomes: list[Outcome] = []
    todo = iter(plans)  # shared by the workers: each plan goes to one of them
    step = max(1, len(plans) // 10) if progress else 0
    started = time.monotonic()
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(limits=limits, timeout=CLIENT_TIMEOUT_S) as client:

        async def worker() -> None:
            for plan in todo:
                outcomes.append(await send(client, url, plan))
                if step and len(outcomes) % step == 0:
                    print(f"  {len(outcomes)}/{len(plans)} in {time.monotonic() - started:.0f} s", flush=True)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outcomes

"""`jaxserver bench`: drive a running server over HTTP and report throughput and latency.

Modelled on `vllm bench serve`: N requests with a given prompt and output length, at a fixed concurrency
(or a Poisson request rate), each streamed from `/instruct` with `ignore_eos` so every answer has exactly
the asked length. Reported: request throughput, output tokens/s, time to first token (TTFT), inter-token
latency (ITL: the gap between streamed chunks divided by the tokens in the chunk) and time per output
token (TPOT), each at p50/p90/p99. `--sweep 1,4,16,32` repeats the run per concurrency and can plot it.

Prompts are random sequences of common English words, each one token in byte-level BPE vocabularies, so
`--input-len` is the prompt's length in tokens before the chat template adds its few.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from tqdm import tqdm

WORDS = (
    "the of and to in is was for on are with as his they be at one have this from or had by word but what "
    "some we can out other were all there when up use your how said an each she which do their time if will "
    "way about many then them write would like so these her long make thing see him two has look more day "
    "could go come did number sound no most people my over know water than call first who may down side"
).split()


@dataclass
class RequestResult:
    ok: bool
    latency_s: float = 0.0
    ttft_s: float = 0.0
    output_tokens: int = 0
    itl_s: list[float] = field(default_factory=list)  # per token, from chunk gaps
    gaps_s: list[float] = field(default_factory=list)  # between two chunks, as a client sees its stream pause
    error: str = ""


def make_prompt(rng: random.Random, tokens: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(tokens))


async def one_request(
    client: httpx.AsyncClient, url: str, prompt: str, output_len: int, temperature: float = 0.0
) -> RequestResult:
    body = {
        "prompt": prompt,
        "max_new_tokens": output_len,
        "ignore_eos": True,
        "stream": True,
        "greedy": temperature == 0.0,
    }
    if temperature > 0.0:
        body["temperature"] = temperature  # top_p and top_k: the server's defaults
    started = time.perf_counter()
    last, result = started, RequestResult(ok=False)
    try:
        async with client.stream("POST", f"{url}/instruct", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread()).decode()[:200]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[len("data: ") :])
                if "error" in event:
                    result.error = event["error"]["message"]
                    return result
                now = time.perf_counter()
                new = event["tokens_used"] - result.output_tokens
                if result.output_tokens == 0:
                    result.ttft_s = now - started
                elif new > 0:
                    result.itl_s += [(now - last) / new] * new
                    result.gaps_s.append(now - last)
                result.output_tokens, last = event["tokens_used"], now
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.ok, result.latency_s = True, time.perf_counter() - started
    return result


async def run_load(
    url: str,
    num_requests: int,
    concurrency: int,
    input_len: int,
    output_len: int,
    rate: float | None,
    seed: int,
    temperature: float = 0.0,
) -> tuple[list[RequestResult], float]:
    rng = random.Random(seed)
    prompts = [make_prompt(rng, input_len) for _ in range(num_requests)]
    limit = asyncio.Semaphore(concurrency)
    bar = tqdm(total=num_requests, desc=f"concurrency {concurrency}", unit="req", file=sys.stderr)
    timeout = httpx.Timeout(600.0, connect=10.0)
    async with httpx.AsyncClient(
        timeout=timeout, limits=httpx.Limits(max_connections=concurrency + 4)
    ) as client:

        async def limited(prompt: str, delay: float) -> RequestResult:
            await asyncio.sleep(delay)
            async with limit:
                result = await one_request(client, url, prompt, output_len, temperature)
            bar.update(1)
            return result

        delays = (
            np.cumsum(np.random.default_rng(seed).exponential(1 / rate, num_requests))
            if rate
            else [0.0] * num_requests
        )
        started = time.perf_counter()
        results = await asyncio.gather(*(limited(p, float(d)) for p, d in zip(prompts, delays, strict=True)))
        duration = time.perf_counter() - started
    bar.close()
    return list(results), duration


def step_totals(url: str) -> dict[str, float] | None:
    """The server's engine step totals from /status, or None when it does not report them."""
    try:
        engine = httpx.get(f"{url}/status", timeout=10).json().get("engine") or {}
    except (httpx.HTTPError, ValueError):
        return None
    return engine.get("step_totals")


def engine_profile(before: dict[str, float], after: dict[str, float], duration_s: float) -> dict[str, float]:
    """Where the engine's time went between two readings of its step totals."""
    d = {key: after[key] - before[key] for key in after}
    steps = max(d["decode_steps"], 1)
    reused = d.get("prompt_tokens_reused", 0)  # servers before prefix caching do not report it
    return {
        "prompt_reused_share": reused / max(d["prompt_tokens"] + reused, 1),
        "prefill_share": d["prefill_seconds"] / duration_s,
        "decode_share": d["decode_seconds"] / duration_s,
        "prompt_padding_share": 1 - d["prompt_tokens"] / max(d["prompt_tokens_computed"], 1),
        "prefill_tokens_per_s": d["prompt_tokens_computed"] / max(d["prefill_seconds"], 1e-9),
        "decode_ms_per_step": 1000 * d["decode_seconds"] / steps,
        "decode_rows_per_step": d["decode_tokens"] / steps,
        "decode_rows_computed_per_step": d["decode_rows_computed"] / steps,
        "decode_steps_per_call": d["decode_steps"] / max(d["decode_calls"], 1),
    }


def measure(
    url: str,
    num_requests: int,
    concurrency: int,
    input_len: int,
    output_len: int,
    rate: float | None,
    seed: int,
    temperature: float = 0.0,
) -> dict:
    """One load level, summarized, with the engine's profile over it when the server reports one."""
    before = step_totals(url)
    results, duration = asyncio.run(
        run_load(url, num_requests, concurrency, input_len, output_len, rate, seed, temperature)
    )
    row = summarize(results, duration, concurrency)
    after = step_totals(url)
    if before and after:
        row["engine"] = engine_profile(before, after, duration)
    return row


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": float("nan"), "p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
    arr = np.asarray(values)
    return {"mean": float(arr.mean()), **{f"p{q}": float(np.percentile(arr, q)) for q in (50, 90, 99)}}


def summarize(results: list[RequestResult], duration_s: float, concurrency: int) -> dict:
    done = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in done)
    tpot = [(r.latency_s - r.ttft_s) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    return {
        "concurrency": concurrency,
        "completed": len(done),
        "failed": len(results) - len(done),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration_s,
        "request_throughput_per_s": len(done) / duration_s,
        "output_tokens_per_s": output_tokens / duration_s,
        "ttft_s": percentiles([r.ttft_s for r in done]),
        "itl_s": percentiles([x for r in done for x in r.itl_s]),
        "gap_s": percentiles([x for r in done for x in r.gaps_s]),
        "tpot_s": percentiles(tpot),
        "e2e_latency_s": percentiles([r.latency_s for r in done]),
    }


def print_table(rows: list[dict]) -> None:
    header = (
        f"{'conc':>5} {'ok':>5} {'fail':>4} {'req/s':>7} {'out tok/s':>10} "
        f"{'TTFT p50':>9} {'p90':>7} {'p99':>7} {'ITL p50':>9} {'p90':>7} {'p99':>7} {'gap p99':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        ms = {k: {q: v * 1000 for q, v in r[k].items()} for k in ("ttft_s", "itl_s", "gap_s")}
        print(
            f"{r['concurrency']:>5} {r['completed']:>5} {r['failed']:>4} {r['request_throughput_per_s']:>7.2f} "
            f"{r['output_tokens_per_s']:>10.1f} {ms['ttft_s']['p50']:>8.0f}ms {ms['ttft_s']['p90']:>5.0f}ms "
            f"{ms['ttft_s']['p99']:>5.0f}ms {ms['itl_s']['p50']:>7.1f}ms {ms['itl_s']['p90']:>5.1f}ms "
            f"{ms['itl_s']['p99']:>5.1f}ms {ms['gap_s']['p99']:>6.0f}ms"
        )
    profiled = [r for r in rows if "engine" in r]
    if profiled:
        print(
            "\nengine profile (share of wall time; prompt tokens found in the cache, and padding; "
            "decode rows: generating / computed per step)"
        )
        header = (
            f"{'conc':>5} {'prefill':>8} {'decode':>7} {'reused':>7} {'padding':>8} {'prefill tok/s':>14} "
            f"{'ms/step':>8} {'rows':>12} {'steps/call':>11}"
        )
        print(header)
        print("-" * len(header))
        for r in profiled:
            e = r["engine"]
            rows_text = f"{e['decode_rows_per_step']:.1f}/{e['decode_rows_computed_per_step']:.1f}"
            print(
                f"{r['concurrency']:>5} {e['prefill_share']:>8.0%} {e['decode_share']:>7.0%} "
                f"{e['prompt_reused_share']:>7.0%} {e['prompt_padding_share']:>8.0%} {e['prefill_tokens_per_s']:>14.0f} "
                f"{e['decode_ms_per_step']:>8.1f} {rows_text:>12} {e['decode_steps_per_call']:>11.1f}"
            )
    for r in rows:
        for error in r["errors"]:
            print(f"  concurrency {r['concurrency']}: {error}")


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "matplotlib is not installed (pip install 'jaxserver[bench]'); no plot written", file=sys.stderr
        )
        return
    conc = [r["concurrency"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(conc, [r["output_tokens_per_s"] for r in rows], marker="o")
    left.set(
        xlabel="concurrent requests", ylabel="output tokens/s", title="Throughput", xscale="log", xticks=conc
    )
    left.set_xticklabels([str(c) for c in conc])
    for key, label in (("ttft_s", "TTFT p50"), ("itl_s", "ITL p50"), ("tpot_s", "TPOT p50")):
        right.plot(conc, [r[key]["p50"] * 1000 for r in rows], marker="o", label=label)
    right.set(
        xlabel="concurrent requests", ylabel="ms", title="Latency", xscale="log", yscale="log", xticks=conc
    )
    right.set_xticklabels([str(c) for c in conc])
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:2059", help="the server to drive")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight at most")
    parser.add_argument("--sweep", default=None, help="comma-separated concurrencies, e.g. 1,4,16,32")
    parser.add_argument("--request-rate", type=float, default=None, help="Poisson arrivals per second")
    parser.add_argument("--input-len", type=int, default=128, help="prompt words (about one token each)")
    parser.add_argument("--output-len", type=int, default=128, help="new tokens per request")
    parser.add_argument(
        "--temperature", type=float, default=0.0, help="0: greedy; above 0: sampled (server's top_p, top_k)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--plot", type=Path, default=None, help="with --sweep: a PNG of the sweep")


def run(args: argparse.Namespace) -> int:
    levels = [int(c) for c in args.sweep.split(",")] if args.sweep else [args.concurrency]
    rows = []
    for concurrency in levels:
        rows.append(
            measure(
                args.url,
                args.num_requests,
                concurrency,
                args.input_len,
                args.output_len,
                args.request_rate,
                args.seed,
                args.temperature,
            )
        )
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}
    print_table(rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"settings": settings, "results": rows}, indent=2))
        print(f"results written to {args.json}")
    if args.plot:
        plot(rows, args.plot)
    return 0 if all(r["failed"] == 0 for r in rows) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="jaxserver bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

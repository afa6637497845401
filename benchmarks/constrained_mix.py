"""What constrained requests cost the plain ones beside them: `jaxserver serve` with the default model,
driven with N plain streamed requests at once, then N/2 plain beside N/2 constrained by a JSON schema
(the same batch size). Prints the plain requests' mean decode rate (tokens after the first, over the time
since the first) in both, and the ratio; and the constrained requests' rate.

    python benchmarks/constrained_mix.py [--streams 32] [--output-len 128] [--flags "--max-length 1024"]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from jaxserver.launch import start_server, wait_until_compiled

# Long enough that no answer completes within --output-len: every row, plain or constrained, generates
# the same number of tokens, so the two runs differ only in the constraint.
SCHEMA = {
    "type": "object",
    "properties": {"chapters": {"type": "array", "items": {"type": "string"}, "minItems": 10000}},
    "required": ["chapters"],
}
PROMPT = "Write a long story about a dragon who learns to paint, with many chapters."


async def one(client: httpx.AsyncClient, url: str, output_len: int, constrained: bool, seed: int) -> dict:
    body = {
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": output_len,
        "stream": True,
        "seed": seed,
        "temperature": 0.7,
        "stream_options": {"include_usage": True},
    }
    if constrained:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "book", "schema": SCHEMA}}
    else:
        body["ignore_eos"] = True
    first = tokens = None
    text = ""
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            for choice in event["choices"]:
                text += choice["delta"].get("content") or ""
                if first is None and choice["delta"].get("content"):
                    first = time.perf_counter()
    return {"tokens": tokens, "first": first, "end": time.perf_counter(), "text": text}


def rate(result: dict) -> float:
    return (result["tokens"] - 1) / (result["end"] - result["first"])


async def drive(url: str, plain: int, constrained: int, output_len: int) -> tuple[list[dict], list[dict]]:
    async with httpx.AsyncClient(timeout=600) as client:
        before = (await client.get(f"{url}/status")).json()["engine"]["step_totals"]
        jobs = [one(client, url, output_len, False, i) for i in range(plain)]
        jobs += [one(client, url, output_len, True, 100 + i) for i in range(constrained)]
        results = await asyncio.gather(*jobs)
        after = (await client.get(f"{url}/status")).json()["engine"]["step_totals"]
    steps = {k: after[k] - before[k] for k in after}
    per_step = 1e3 * steps["decode_seconds"] / max(steps["decode_steps"], 1)
    print(
        f"  ({plain} plain, {constrained} constrained: decode {per_step:.1f} ms/step over "
        f"{steps['decode_steps']} steps in {steps['decode_calls']} calls, {steps['prefill_calls']} single steps)"
    )
    return results[:plain], results[plain:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--flags", default="")
    args = parser.parse_args()
    log = Path(tempfile.mkdtemp()) / "serve.log"
    server = start_server(shlex.split(args.flags), log, timeout_s=900)
    try:
        wait_until_compiled(server.url)
        half = args.streams // 2
        asyncio.run(drive(server.url, half, half, 16))  # compiles what the mix needs
        alone, _ = asyncio.run(drive(server.url, args.streams, 0, args.output_len))
        mixed, constrained = asyncio.run(drive(server.url, half, half, args.output_len))
    finally:
        server.stop()
    plain_alone = statistics.mean(map(rate, alone))
    plain_mixed = statistics.mean(map(rate, mixed))
    print(f"{args.streams} plain streams:                  {plain_alone:6.1f} tokens/s per stream")
    print(f"{half} plain beside {half} constrained:        {plain_mixed:6.1f} tokens/s per plain stream")
    print(f"  plain streams in the mix / alone: {plain_mixed / plain_alone:.2f}x")
    print(f"  constrained streams: {statistics.mean(map(rate, constrained)):.1f} tokens/s per stream")


if __name__ == "__main__":
    main()

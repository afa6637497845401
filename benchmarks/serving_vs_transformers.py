"""Aggregate throughput of `jaxserver serve` under concurrent streams, beside Hugging Face transformers'
batched `generate` on the same GGUF weights, in one run on this machine.

1. starts `jaxserver serve` (default model, --dtype weights: by default the server's "auto") on a free port and waits until it is ready and has
   compiled its rarer decode shapes in the background;
2. drives it with `jaxserver bench` at each concurrency of --sweep (same prompts for every level);
3. stops it, then times transformers (torch CPU, float32, and also bfloat16 when the server ran
   bfloat16 weights, as "auto" does on CPUs with AVX512-BF16) `generate` at batch 1 and at the largest concurrency, greedy, exactly --output-len
   new tokens, on the same chat-formatted prompts.

    python benchmarks/serving_vs_transformers.py [--sweep 1,8,32] [--input-len 128] [--output-len 128]
                                                 [--dtype auto|fp32|bf16]

Prints a table, the issue's targets as ratios, and writes JSON (and a PNG of the sweep) under
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import httpx

from jaxserver.bench import make_prompt, measure, plot, print_table
from jaxserver.launch import start_server, wait_until_compiled

RESULTS = Path("benchmarks/results")


def transformers_tokens_per_s(prompts: list[str], output_len: int, batch: int, dtype: str) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jaxserver.model.loader import default_model_path

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tokenizer.padding_side = "left"
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch_dtype)
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in prompts[:batch]
    ]
    inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    settings = {
        "max_new_tokens": output_len,
        "min_new_tokens": output_len,
        "do_sample": False,
        "pad_token_id": 2,
    }
    with torch.no_grad():
        model.generate(**inputs, **(settings | {"max_new_tokens": 2, "min_new_tokens": 2}))  # warm-up
        started = time.perf_counter()
        out = model.generate(**inputs, **settings)
        elapsed = time.perf_counter() - started
    assert out.shape[1] - inputs["input_ids"].shape[1] == output_len
    return batch * output_len / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sweep", default="1,8,32")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument(
        "--requests-per-level",
        type=int,
        default=4,
        help="requests = this x concurrency (min 4): the ramp while the first requests are prefilled and "
        "the tail while the last ones drain weigh less with more (at 32 streams, 4 gave 9%% more "
        "tokens/s than 2)",
    )
    parser.add_argument(
        "--dtype",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="the server's weights (default: its own)",
    )
    args = parser.parse_args()
    levels = [int(c) for c in args.sweep.split(",")]
    RESULTS.mkdir(parents=True, exist_ok=True)

    flags = ["--max-batch-size", str(max(levels)), "--max-length", "1024", "--dtype", args.dtype]
    server = start_server(flags, RESULTS / "serve.log", timeout_s=600)
    rows = []
    try:
        wait_until_compiled(server.url)
        served = httpx.get(f"{server.url}/status", timeout=10).json()["dtype"]  # "auto" resolved
        weights = {"float32": "fp32", "bfloat16": "bf16"}[served]
        for concurrency in levels:
            n = max(4, args.requests_per_level * concurrency)
            rows.append(measure(server.url, n, concurrency, args.input_len, args.output_len, None, seed=0))
    finally:
        server.stop(timeout_s=60)
    print_table(rows)

    rng = random.Random(0)
    prompts = [make_prompt(rng, args.input_len) for _ in range(max(levels))]
    top = max(levels)
    ours = {r["concurrency"]: r["output_tokens_per_s"] for r in rows}
    ratios: dict[str, float | None] = {}
    hf: dict[str, dict[int, float]] = {}
    for dtype in sorted({"fp32", weights}, reverse=True):
        hf[dtype] = {
            batch: transformers_tokens_per_s(prompts, args.output_len, batch, dtype)
            for batch in sorted({1, top})
        }
        print(
            f"\ntransformers generate ({dtype}): batch 1 {hf[dtype][1]:.1f} tok/s, "
            f"batch {top} {hf[dtype][top]:.1f} tok/s"
        )
        ratios[f"jaxserver {top} streams / transformers {dtype} batch {top} (target >= 2 vs fp32)"] = (
            ours[top] / hf[dtype][top]
        )
        ratios[f"jaxserver 1 stream / transformers {dtype} batch 1 (target >= 2 vs fp32)"] = (
            ours[1] / hf[dtype][1] if 1 in ours else None
        )
    ratios[f"jaxserver {top} streams / jaxserver 1 stream (target >= 4)"] = (
        ours[top] / ours[1] if 1 in ours else None
    )
    print(f"\njaxserver ran {weights} weights")
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}" if value is not None else f"{name}: not measured")
    report = {
        "settings": vars(args) | {"weights": weights},
        "machine": f"{os.cpu_count()} cores",
        "jaxserver": rows,
        "transformers_tokens_per_s": hf,
        "ratios": ratios,
    }
    (RESULTS / f"serving_vs_transformers_{weights}.json").write_text(json.dumps(report, indent=2))
    plot(rows, RESULTS / f"serving_sweep_{weights}.png")


if __name__ == "__main__":
    main()

"""The ragged step over a paged KV cache (`model/paged.py`), at the default model's shapes with random
weights: seconds to compile one token-count shape, and milliseconds per call for decode batches, a prompt
piece, and both in one batch, at two pool sizes (a step whose time grew with the pool would be copying
pages instead of updating them in place).

    python benchmarks/ragged_step.py [--pages 1024,8192] [--context 200] [--dtype bf16]

Each call is one forward pass of the flat batch plus the logits of each sequence's last token (no
sampling, no host work beyond reading the logits back).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxserver.model import cpu_kernels, llama, paged, serving_layout
from jaxserver.model.config import ModelConfig

T = paged.PAGE_TOKENS
SMOLLM2_135M = ModelConfig(  # the default model's shapes
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    rope_theta=100000.0,
    tie_word_embeddings=True,
)


def batch(seqs: int, context: int, prompt: int, max_pages: int) -> dict[str, np.ndarray]:
    """`seqs` decode tokens at position `context` of their sequences, then (when `prompt`) one sequence's
    first `prompt` tokens; page tables of distinct pages."""
    rows = seqs + (1 if prompt else 0)
    tokens = np.full(seqs + prompt, 7, np.int32)
    positions = np.asarray([context] * seqs + list(range(prompt)), np.int32)
    token_seqs = np.asarray(list(range(seqs)) + [seqs] * prompt, np.int32)
    table = np.arange(rows * max_pages, dtype=np.int32).reshape(rows, max_pages)
    last = np.asarray(list(range(seqs)) + ([seqs + prompt - 1] if prompt else []), np.int32)
    return {
        "tokens": tokens,
        "positions": positions,
        "token_seqs": token_seqs,
        "page_table": table,
        "logit_index": last,
    }


def measure(step, head, layers, cache, inputs, calls: int = 10) -> tuple[float, float, paged.PagedKVCache]:
    """(seconds to compile, median milliseconds per call, the cache after the calls)."""
    started = time.perf_counter()
    compiled = step.lower(head, layers, cache=cache, **inputs).compile()
    compile_s = time.perf_counter() - started
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        logits, cache = compiled(head, layers, cache=cache, **inputs)
        np.asarray(logits)
        times.append((time.perf_counter() - started) * 1000)
    return compile_s, statistics.median(times), cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", default="1024,8192", help="pool sizes to compare (pages of 16 tokens)")
    parser.add_argument("--context", type=int, default=200, help="position of the decode tokens")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="weights")
    args = parser.parse_args()
    cfg = SMOLLM2_135M
    dtype = jnp.bfloat16 if args.dtype == "bf16" else jnp.float32
    params = llama.init_params(cfg, jax.random.key(0), dtype)
    max_pages = 2048 // T
    head, layers = serving_layout.serving_weights(params, cfg, max_pages * T)  # as the runner serves them

    def forward_logits(head, layers, **inputs):
        hidden, cache = paged.forward_ragged(head, layers, cfg, **inputs)
        return paged.output_logits(head, hidden), cache

    step = jax.jit(forward_logits, donate_argnames="cache")
    cases = [("decode", 1, 0), ("decode", 8, 0), ("decode", 32, 0), ("decode", 64, 0), ("prompt", 0, 256)]
    cases += [("mixed", 32, 224), ("prompt", 0, 128), ("prompt", 0, 512)]
    print(f"jax {jax.__version__}, weights {args.dtype}, kernels {cpu_kernels.available()}, pages float16")
    print("| pool pages | batch | tokens | compile (s) | ms per call |")
    print("|---|---|---|---|---|")
    for pages in (int(p) for p in args.pages.split(",")):
        cache = paged.init_paged_cache(cfg, pages, jnp.float16)
        for name, seqs, prompt in cases:
            inputs = batch(seqs, args.context, prompt, max_pages)
            # A small pool has fewer pages than the tables name: they share pages (the same reads).
            inputs["page_table"] %= pages
            compile_s, ms, cache = measure(step, head, layers, cache, inputs)
            label = f"{name} {seqs} x 1" if name == "decode" else f"{name} {seqs} + {prompt}"
            print(f"| {pages} | {label} | {len(inputs['tokens'])} | {compile_s:.1f} | {ms:.1f} |")


if __name__ == "__main__":
    main()

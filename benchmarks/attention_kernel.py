"""The decode-attention kernel alone (src/jaxserver/model/kernels/decode_attention.cc): milliseconds for
one decode step's attention over all layers (each row's new key and value written, then attended), at
SmolLM2-135M's heads (30 layers, 3 kv heads of 64, 3 query heads each), every row attending to
`--context` cached positions of its own slot in a cache of `--cache-length`, and the cache bytes read per
second.

    python benchmarks/attention_kernel.py [--rows 1,8,32] [--context 200,900] [--cache-length 1024]

Each layer's call reads a different cache, as in the model, so the figures include reading the cache
from memory, not from the CPU's caches.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxserver.model import cpu_kernels, llama

LAYERS, KV_HEADS, GROUP, HEAD_DIM = 30, 3, 3, 64


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", default="1,8,32")
    parser.add_argument("--context", default="200,900")
    parser.add_argument("--cache-length", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    if not cpu_kernels.available():
        raise SystemExit("the kernel could not be built here (see the logged reason)")
    rows_list = [int(n) for n in args.rows.split(",")]
    slots, length = max(rows_list), args.cache_length
    rng = np.random.default_rng(0)
    keys = (slots, KV_HEADS, llama.key_blocks(length), HEAD_DIM, llama.KEY_BLOCK)  # as llama.KVCache
    k_caches = [jnp.asarray(rng.standard_normal(keys, np.float32)) for _ in range(LAYERS)]
    v_caches = [
        jnp.asarray(rng.standard_normal((slots, KV_HEADS, length, HEAD_DIM), np.float32))
        for _ in range(LAYERS)
    ]

    # The caches are donated, as in the engine, so the kernel writes each row's new entry in place.
    @functools.partial(jax.jit, donate_argnums=(4, 5))
    def all_layers(q, slot_ids, starts, ends, k_caches, v_caches):
        new_k, new_v = [], []
        for k_cache, v_cache in zip(k_caches, v_caches, strict=True):  # each output feeds the next call
            entry = q[:, :, 0]  # the new key and value: [rows, kv heads, head_dim]
            q, k_cache, v_cache = cpu_kernels.decode_attention(
                q * 0.1, entry, entry, k_cache, v_cache, slot_ids, starts, ends
            )
            new_k.append(k_cache)
            new_v.append(v_cache)
        return q, new_k, new_v

    print(f"jax {jax.__version__}; {LAYERS} layers, {KV_HEADS} kv heads x {GROUP} queries x {HEAD_DIM}")
    print(" rows  context  ms/step  cache GB/s")
    for context in (int(n) for n in args.context.split(",")):
        for rows in rows_list:
            q = jnp.asarray(rng.standard_normal((rows, KV_HEADS, GROUP, HEAD_DIM), np.float32))
            slot_ids = jnp.arange(rows, dtype=jnp.int32)
            starts = jnp.zeros(rows, jnp.int32)
            ends = jnp.full(rows, context - 1, jnp.int32)
            _, k_caches, v_caches = all_layers(q, slot_ids, starts, ends, k_caches, v_caches)  # compile
            times = []
            for _ in range(args.repeats):
                started = time.perf_counter()
                out, k_caches, v_caches = all_layers(q, slot_ids, starts, ends, k_caches, v_caches)
                out.block_until_ready()
                times.append(time.perf_counter() - started)
            seconds = float(np.median(times))
            cache_bytes = 2 * LAYERS * rows * KV_HEADS * context * HEAD_DIM * 4
            print(f"{rows:5d} {context:8d} {seconds * 1e3:8.2f} {cache_bytes / seconds / 1e9:11.1f}")


if __name__ == "__main__":
    main()

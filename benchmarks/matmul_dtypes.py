"""Weight-matmul throughput by dtype and rows, as `llama.linear` runs them: 30 matmuls of [rows, 576] x
[576, 3072] (SmolLM2-135M's hidden size; 3072 = the gate/up width) in one jitted call, float32 against
bfloat16 weights with float32 accumulation, a bfloat16 result for comparison, the AVX512-BF16 kernel
`cpu_kernels.bf16_gemm` that jaxserver uses for bf16 weights (where the CPU has AVX512-BF16), on weights
packed for it, and the quantized weights' kernel `cpu_kernels.quant_gemm` (4-bit codes with scales and mins
per 32 inputs, as GGUF's Q4_1, and 8-bit ones as Q8_0) beside their XLA path (dequantized in the step).
GB/s is the weights' bytes read per second.

    python benchmarks/matmul_dtypes.py [--rows 1,2,8,32,256]

The figures for bf16 weights in docs/performance.md ("bf16 matmul kernel") come from here: the bf16 x
bf16 -> f32 dot's GFLOP/s beside float32's and the kernel's, and how slow a single bf16 row is next to two
(why `linear` pads a lone row).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxserver.model import cpu_kernels, quant

LAYERS, HIDDEN, WIDTH = 30, 576, 3072


def seconds_per_call(fn, x: jax.Array, weights: list[jax.Array], repeats: int) -> float:
    fn(x, weights).block_until_ready()  # compile
    started = time.perf_counter()
    for _ in range(repeats):
        fn(x, weights).block_until_ready()
    return (time.perf_counter() - started) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", default="1,2,8,32,256")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    f32 = [jnp.asarray(rng.standard_normal((HIDDEN, WIDTH)) * 0.02, jnp.float32) for _ in range(LAYERS)]
    bf16 = [w.astype(jnp.bfloat16) for w in f32]
    packed = [cpu_kernels.pack_bf16_weight(w) for w in bf16] if cpu_kernels.bf16_gemm_available() else []
    q4, q8 = (
        [jax.tree.map(jnp.asarray, quant.quantize(np.asarray(w), bits, 32)) for w in f32] for bits in (4, 8)
    )
    kernel = quant.linear if cpu_kernels.quant_gemm_available() else None
    # Summing a slice of each product keeps every matmul live without adding much work.
    variants = {
        "f32": (f32, lambda x, ws: sum((x @ w)[:, :HIDDEN] for w in ws)),
        "bf16 x bf16 -> f32": (
            bf16,
            lambda x, ws: sum(
                jnp.matmul(x.astype(w.dtype), w, preferred_element_type=jnp.float32)[:, :HIDDEN] for w in ws
            ),
        ),
        "bf16 x bf16 -> bf16": (bf16, lambda x, ws: sum((x.astype(w.dtype) @ w)[:, :HIDDEN] for w in ws)),
        "bf16 x bf16 -> f32, kernel": (
            packed,
            lambda x, ws: sum(cpu_kernels.bf16_gemm(x, w)[:, :HIDDEN] for w in ws),
        ),
        "q4, kernel": ([quant.tiled(w) for w in q4], lambda x, ws: sum(kernel(x, w)[:, :HIDDEN] for w in ws)),
        "q8, kernel": ([quant.tiled(w) for w in q8], lambda x, ws: sum(kernel(x, w)[:, :HIDDEN] for w in ws)),
        "q4, XLA": (q4, lambda x, ws: sum(quant.linear_xla(x, w)[:, :HIDDEN] for w in ws)),
    }
    runs = {
        "bf16 x bf16 -> f32, kernel": cpu_kernels.bf16_gemm_available(),
        "q4, kernel": kernel is not None,
        "q8, kernel": kernel is not None,
    }
    print(f"jax {jax.__version__}; {LAYERS} matmuls of [rows, {HIDDEN}] x [{HIDDEN}, {WIDTH}]")
    print(f"{'rows':>5} {'variant':>26} {'ms':>8} {'GFLOP/s':>8} {'GB/s':>6}")
    for rows in (int(r) for r in args.rows.split(",")):
        x = jnp.asarray(rng.standard_normal((rows, HIDDEN)), jnp.float32)
        for name, (weights, body) in variants.items():
            if not runs.get(name, True):
                continue
            elapsed = seconds_per_call(jax.jit(body), x, weights, args.repeats)
            flops = 2 * rows * HIDDEN * WIDTH * LAYERS
            read = sum(leaf.nbytes for leaf in jax.tree.leaves(weights)) / elapsed / 1e9
            print(
                f"{rows:>5} {name:>26} {elapsed * 1e3:>8.2f} {flops / elapsed / 1e9:>8.0f} {read:>6.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()

"""Where a prompt's prefill time goes: milliseconds for one prompt piece through the engine's compiled
prefill (`Runner.prefill`), at the default model's shapes with random weights (speed does not depend on
their values), prompt tokens per second, and with --profile a JAX profiler trace of one call summed by XLA
operation kind (as benchmarks/decode_step.py does for decode steps).

    python benchmarks/prefill_step.py [--tokens 160,512] [--dtype bfloat16] [--profile]
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from decode_step import SMOLLM2_135M, op_kinds

from jaxserver.engine import runner as engine_runner
from jaxserver.model import llama


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", default="160,512", help="comma-separated prompt lengths")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="bfloat16", help="weight dtype (float32 or bfloat16)")
    parser.add_argument("--profile", action="store_true", help="print time by XLA operation kind")
    args = parser.parse_args()

    params = llama.init_params(SMOLLM2_135M, jax.random.key(0), jnp.dtype(args.dtype))
    runner = engine_runner.Runner(
        SMOLLM2_135M,
        params,
        slots=args.repeats,
        cache_len=args.max_length,
        steps_per_call=32,
        eos_ids=(0,),
        cache_dtype=jnp.float32,
    )
    greedy = engine_runner.sampling_rows(1, temperature=0.0, top_p=1.0, top_k=0, greedy=True, seed=0)
    print(f"jax {jax.__version__}, {args.dtype} weights, attention kernel: {runner.attention_kernel}")
    print(f"{'tokens':>7} {'ms':>8} {'tokens/s':>9}")
    for length in (int(n) for n in args.tokens.split(",")):
        prompt = [1 + i % 1000 for i in range(length)]
        prefill = functools.partial(
            runner.prefill, tokens=prompt, write_pos=0, start=0, logit_index=length - 1, sampling=greedy
        )
        prefill(0)  # compiles this length
        started = time.perf_counter()
        for slot in range(args.repeats):
            prefill(slot)
        seconds = (time.perf_counter() - started) / args.repeats
        print(f"{length:>7} {seconds * 1e3:>8.1f} {length / seconds:>9.0f}", flush=True)
        if args.profile:
            with tempfile.TemporaryDirectory() as trace_dir:
                jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
                prefill(0)
                jax.profiler.stop_trace()
                kinds = op_kinds(Path(trace_dir))
            print(f"        profile (traced), ms; all ops {sum(kinds.values()) / 1e3:.1f}:")
            for kind, micros in kinds.most_common(6):
                print(f"        {micros / 1e3:8.2f}  {kind}")


if __name__ == "__main__":
    main()

"""Where a decode step's time goes: milliseconds per step of the engine's compiled decode chunk, by batch
size, at the default model's shapes (SmolLM2-135M: 30 layers, hidden 576, 9/3 heads, vocabulary 49152),
with random weights (speed does not depend on their values) and EOS ignored, so every chunk runs all its
steps. With --profile, a JAX profiler trace of one chunk per batch size, summed by XLA operation kind;
with --no-attention, the step without decode attention (so the difference is attention's cost); with
--xla-attention, attention by XLA's ops instead of the CPU kernel (model/cpu_kernels.py).

    python benchmarks/decode_step.py [--batch 1,8,32] [--context 200] [--profile] [--no-attention]

The figures come from the same `Runner.decode` the engine calls, so they include sampling and the host
round trip at the chunk's end, but no prefill or HTTP.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxserver.engine import runner as engine_runner
from jaxserver.model import llama
from jaxserver.model.config import ModelConfig

SMOLLM2_135M = ModelConfig(
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


def busy_state(rows: int, slots: int, context: int, greedy: bool) -> engine_runner.DecodeState:
    """Host state with `rows` slots decoding from `context` cached tokens, with no end in sight."""
    state = engine_runner.idle_state(slots)
    for slot in range(rows):
        sampling = engine_runner.sampling_rows(
            1, temperature=0.7, top_p=0.95, top_k=50, greedy=greedy, seed=slot
        )
        engine_runner.set_slot(
            state,
            slot,
            token=5,
            length=context,
            start=0,
            remaining=1 << 30,
            stop_at_eos=False,
            sampling=sampling,
        )
    return state


def skip_attention(q: jax.Array, *_) -> jax.Array:
    """Stands in for `llama.decode_attention` under --no-attention: the queries, shaped like its output."""
    return q.reshape(q.shape[0], 1, -1)


def op_kinds(trace_dir: Path) -> collections.Counter[str]:
    """Microseconds per XLA operation kind (instruction names without their numeric suffix)."""
    trace_file = max(trace_dir.rglob("*perfetto_trace.json.gz"), key=lambda path: path.stat().st_mtime)
    with gzip.open(trace_file) as compressed:
        events = json.load(compressed)
    events = events["traceEvents"] if isinstance(events, dict) else events
    kinds: collections.Counter[str] = collections.Counter()
    for event in events:
        name = event.get("name", "")
        # Python frames ($...), the host's wait for the result and thunk-executor spans are not XLA ops.
        if event.get("ph") != "X" or name.startswith(("$", "end:")) or any(c in name for c in " (:"):
            continue
        kinds[re.sub(r"[._]\d+$", "", name)] += event.get("dur", 0)
    return kinds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", default="1,8,32", help="comma-separated numbers of decoding rows")
    parser.add_argument("--context", type=int, default=200, help="tokens already in each row's cache")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=32, help="decode steps per compiled chunk")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", help="weight dtype (float32 or bfloat16)")
    parser.add_argument(
        "--cache-dtype",
        default="float32",
        help="KV cache dtype: float32, float16 (the server's default where the attention kernel runs) or bfloat16",
    )
    parser.add_argument("--sample", action="store_true", help="top-k/top-p sampling instead of greedy")
    parser.add_argument("--profile", action="store_true", help="print time by XLA operation kind")
    parser.add_argument(
        "--xla-attention", action="store_true", help="attend with XLA's ops instead of the CPU kernel"
    )
    parser.add_argument(
        "--no-attention",
        action="store_true",
        help="replace decode attention by passing the queries through: what the rest of the step costs",
    )
    args = parser.parse_args()
    if args.no_attention:
        llama.decode_attention = skip_attention
    batches = [int(b) for b in args.batch.split(",")]

    params = llama.init_params(SMOLLM2_135M, jax.random.key(0), jnp.dtype(args.dtype))
    runner = engine_runner.Runner(
        SMOLLM2_135M,
        params,
        slots=max(batches),
        cache_len=args.max_length,
        steps_per_call=args.steps,
        eos_ids=(0,),
        cache_dtype=jnp.dtype(args.cache_dtype),
        attention_kernel=False if args.xla_attention or args.no_attention else None,
    )
    attention = "none" if args.no_attention else "CPU kernel" if runner.attention_kernel else "XLA"
    print(
        f"jax {jax.__version__}, {args.dtype} weights, {args.cache_dtype} KV cache, decode attention: {attention}"
    )
    print(f"{'rows':>5} {'attended':>9} {'ms/step':>8} {'tok/s':>7} {'cores busy':>10}")
    for rows in batches:
        state = busy_state(rows, runner.slots, args.context, greedy=not args.sample)
        runner.decode(state)  # compiles this shape
        started, cpu_started = time.perf_counter(), time.process_time()
        for _ in range(args.repeats):
            runner.decode(state)
        elapsed = time.perf_counter() - started
        cores_busy = (time.process_time() - cpu_started) / elapsed  # of os.cpu_count()
        per_step = elapsed / args.repeats / args.steps
        attended = runner.decode_shape(state, args.steps)[1]
        print(
            f"{rows:>5} {attended:>9} {per_step * 1e3:>8.1f} {rows / per_step:>7.1f} {cores_busy:>10.2f}",
            flush=True,
        )
        if args.profile:
            with tempfile.TemporaryDirectory() as trace_dir:
                jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
                runner.decode(state)
                jax.profiler.stop_trace()
                kinds = op_kinds(Path(trace_dir))
            print(
                f"      profile (traced, so slower), ms per step; all ops {sum(kinds.values()) / 1e3 / args.steps:.1f}:"
            )
            for kind, micros in kinds.most_common(8):
                print(f"      {micros / 1e3 / args.steps:8.2f}  {kind}")


if __name__ == "__main__":
    main()

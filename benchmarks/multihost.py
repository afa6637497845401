"""What serving from a group of processes costs (docs/multihost.md), on one machine over loopback:

1. `channel`: the time process 0 takes to send one step's inputs to the other process (`StepChannel`), for
   a decode step of 1, 32 and 64 sequences of the default model (page tables for --max-length, sampling
   rows, the token mask) and for a multi-step decode call's inputs;
2. `serving`: `jaxserver bench` output tokens/s of 2 processes x 4 devices against 1 process x 8 devices,
   one after the other with the same load and flags.

    python benchmarks/multihost.py [--part channel|serving|both] [--sweep 1,32] [--flags "..."]
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from jaxserver.launch import free_port

SENDS = 200


def step_call(sequences: int, max_length: int) -> tuple:
    """A decode step's call as the executor announces it, for `sequences` sequences."""
    from jaxserver.engine.executor import SampleBatch, StepBatch
    from jaxserver.engine.programs import decode_rows, fine_bucket, sampling_rows

    tokens = fine_bucket(sequences, 8, 256)
    rows = min(tokens, 64)
    pages = -(-max_length // 16)
    batch = StepBatch(
        *(np.zeros(tokens, np.int32) for _ in range(3)),
        np.full((rows, pages), 7, np.int32),
        np.zeros(rows, np.int32),
    )
    sample_rows = decode_rows(sequences, 64)
    sample = SampleBatch(
        sampling_rows(sample_rows, temperature=0.7, top_p=0.9, top_k=50, greedy=False, seed=1),
        *(np.zeros(sample_rows, np.int32) for _ in range(3)),
        None,  # no grammar: the other process uses its own all-allowed mask
        False,
        False,
        False,
    )
    return ("step", (batch, sample))


def decode_call(sequences: int, max_length: int) -> tuple:
    from jaxserver.engine.programs import decode_rows, idle_rows

    rows = decode_rows(sequences, 64)
    return ("decode", (idle_rows(rows), np.full((rows, -(-max_length // 16)), 7, np.int32), 32, sequences))


def channel_member(process_id: int, port: int, max_length: int) -> None:
    """One process of the channel measurement: process 0 sends, process 1 receives, SENDS times per call."""
    import jax

    from jaxserver.parallel.group import GroupSettings, StepChannel, join

    join(GroupSettings(f"127.0.0.1:{port}", 2, process_id, 60, 10))
    channel = StepChannel()
    calls = [(f"step, {n} seq", step_call(n, max_length)) for n in (1, 32, 64)]
    calls += [(f"decode call, {n} seq", decode_call(n, max_length)) for n in (1, 32, 64)]
    if process_id == 0:
        print(f"{'call':<22} {'bytes':>9} {'median ms':>10} {'p90 ms':>8}")
    for name, call in calls:
        times = []
        for _ in range(SENDS + 5):
            started = time.perf_counter()
            if process_id == 0:
                channel.send(call)
            else:
                channel.receive()
            times.append(time.perf_counter() - started)
        times = sorted(times[5:])  # the first compile the broadcast
        if process_id == 0:
            import pickle

            size = len(pickle.dumps(call, protocol=pickle.HIGHEST_PROTOCOL))
            median, p90 = statistics.median(times) * 1e3, times[int(0.9 * len(times))] * 1e3
            print(f"{name:<22} {size:>9} {median:>10.2f} {p90:>8.2f}", flush=True)
    jax.distributed.shutdown()


def measure_channel(max_length: int) -> None:
    port = free_port()
    env = os.environ | {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    command = [sys.executable, __file__, "--channel-member"]
    members = [
        subprocess.Popen(
            [*command, str(i), "--port", str(port), "--max-length", str(max_length)],
            env=env,
            stderr=subprocess.DEVNULL,
        )
        for i in (1, 0)
    ]
    for member in members:
        member.wait(timeout=600)


def measure_serving(sweep: list[int], flags: list[str], requests_per_level: int, output_len: int) -> None:
    from jaxserver.bench import measure, print_table
    from jaxserver.launch import start_group, start_server, wait_until_compiled

    rows: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        setups = {
            "1 process x 8 devices": lambda: [
                start_server(
                    flags,
                    Path(tmp) / "one.log",
                    timeout_s=1800,
                    env=os.environ | {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
                )
            ],
            "2 processes x 4 devices": lambda: start_group(flags, Path(tmp), timeout_s=1800),
        }
        for name, start in setups.items():
            members = start()
            try:
                wait_until_compiled(members[0].url)
                rows[name] = [
                    measure(members[0].url, requests_per_level * c, c, 64, output_len, None, seed=0)
                    | {"setup": name}
                    for c in sweep
                ]
            finally:
                for member in members:
                    member.process.terminate()
                for member in members:
                    member.process.wait(timeout=120)
    for name, table in rows.items():
        print(f"\n{name}")
        print_table(table)
    one, two = rows.values()
    print("\nconcurrency  output tok/s (1x8)  (2x4)  ratio 2x4 / 1x8")
    for a, b in zip(one, two, strict=True):
        ratio = b["output_tokens_per_s"] / a["output_tokens_per_s"]
        print(
            f"{a['concurrency']:>11}  {a['output_tokens_per_s']:>17.1f}  {b['output_tokens_per_s']:>5.1f}  {ratio:.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", choices=("channel", "serving", "both"), default="both")
    parser.add_argument("--sweep", default="1,32")
    parser.add_argument("--requests-per-level", type=int, default=2)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--flags", default="--mesh-axes-shape 1,1,-1 --no-ui", help="for every server")
    parser.add_argument("--channel-member", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.channel_member is not None:
        channel_member(args.channel_member, args.port, args.max_length)
        return
    if args.part in ("channel", "both"):
        measure_channel(args.max_length)
    if args.part in ("serving", "both"):
        flags = [*shlex.split(args.flags), "--max-length", str(args.max_length)]
        measure_serving(
            [int(c) for c in args.sweep.split(",")], flags, args.requests_per_level, args.output_len
        )


if __name__ == "__main__":
    main()

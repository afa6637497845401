"""This checkout's `jaxserver serve` beside an earlier commit's, one after the other in one run, with the
same load: start-up time (cold: a new HOME, so every cache jaxserver keeps there is empty: compiled programs,
built kernels, converted models; then warm), peak RSS, and `jaxserver bench` at each concurrency of --sweep.

    python benchmarks/serving_vs_commit.py [--base b91f0cb] [--sweep 1,32,64] [--flags "--max-length 1024"]

The earlier commit is checked out with `git worktree add` next to this checkout (../base-<commit>) and run
from its sources with this environment. Both servers take their default config plus --flags. Prints one
table per server and the ratios, and writes JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from jaxserver.bench import measure, print_table
from jaxserver.launch import ServerProcess, start_server

RESULTS = Path("benchmarks/results")
ROOT = Path(__file__).resolve().parent.parent


def worktree(commit: str) -> Path:
    path = ROOT.parent / f"base-{commit}"
    if not path.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), commit], check=True)
    return path


def peak_rss_mib(server: ServerProcess) -> float:
    status = Path(f"/proc/{server.process.pid}/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def wait_for_background_compiles(url: str, timeout_s: float = 900) -> None:
    """Wait until the server compiles nothing beside serving (either commit's name for it)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        engine = httpx.get(f"{url}/status", timeout=10).json()["engine"]
        compiling = ("programs_compiling", "decode_programs_compiling", "decode_shapes_compiling")
        if not next((engine[key] for key in compiling if key in engine), 0):
            return
        time.sleep(1)
    raise RuntimeError(f"the server was still compiling after {timeout_s} s")


def start(tree: Path, flags: list[str], home: str, log: Path) -> tuple[ServerProcess, float]:
    """Serve from `tree` with HOME at `home`, so that every cache jaxserver keeps under ~/.cache (compiled
    programs, kernels, converted models) starts empty in a new `home`."""
    env = dict(os.environ, PYTHONPATH=str(tree / "src"), HOME=home)
    env.pop("JAXSERVER_KERNEL_DIR", None)
    started = time.monotonic()
    server = start_server(flags, log, timeout_s=900, env=env)
    return server, time.monotonic() - started


def run_tree(name: str, tree: Path, args: argparse.Namespace) -> dict:
    flags = shlex.split(args.flags)
    rows = []
    with tempfile.TemporaryDirectory() as home:
        server, cold_s = start(tree, flags, home, RESULTS / f"serve-{name}-cold.log")
        server.stop(timeout_s=60)
        server, warm_s = start(tree, flags, home, RESULTS / f"serve-{name}.log")
        try:
            wait_for_background_compiles(server.url)
            for concurrency in [int(c) for c in args.sweep.split(",")]:
                n = max(4, args.requests_per_level * concurrency)
                rows.append(
                    measure(server.url, n, concurrency, args.input_len, args.output_len, None, seed=0)
                )
            rss = peak_rss_mib(server)
        finally:
            server.stop(timeout_s=60)
    print(f"\n{name} ({tree}): ready in {cold_s:.0f} s cold, {warm_s:.0f} s warm; peak RSS {rss:.0f} MiB")
    print_table(rows)
    return {
        "tree": str(tree),
        "cold_start_s": cold_s,
        "warm_start_s": warm_s,
        "peak_rss_mib": rss,
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", default="b91f0cb")
    parser.add_argument("--sweep", default="1,32,64")
    parser.add_argument("--input-len", type=int, default=128, help="words per prompt (about 160 tokens)")
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--requests-per-level", type=int, default=3)
    parser.add_argument("--flags", default="", help="extra `jaxserver serve` flags for both servers")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], check=True, capture_output=True, text=True
    )
    runs = {"base": run_tree("base", worktree(args.base), args), "head": run_tree("head", ROOT, args)}
    base, head = runs["base"], runs["head"]
    print(f"\nhead {commit.stdout.strip()} / base {args.base}:")
    print(f"  peak RSS {head['peak_rss_mib'] / base['peak_rss_mib']:.2f}x")
    print(
        f"  ready cold {head['cold_start_s']:.0f} s vs {base['cold_start_s']:.0f} s, warm "
        f"{head['warm_start_s']:.0f} s vs {base['warm_start_s']:.0f} s"
    )
    for ours, theirs in zip(head["rows"], base["rows"], strict=True):
        print(
            f"  {ours['concurrency']:>3} streams: tokens/s {ours['output_tokens_per_s'] / theirs['output_tokens_per_s']:.2f}x, "
            f"TTFT p50 {ours['ttft_s']['p50'] / theirs['ttft_s']['p50']:.2f}x, "
            f"gap p99 {ours['gap_s']['p99'] / max(theirs['gap_s']['p99'], 1e-9):.2f}x"
        )
    out = RESULTS / f"serving_vs_{args.base}.json"
    out.write_text(
        json.dumps({"base": args.base, "head": commit.stdout.strip(), "args": vars(args)} | runs, indent=1)
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

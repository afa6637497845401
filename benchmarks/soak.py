"""A day of traffic compressed: many mixed requests against one `jaxserver serve`, then checks that nothing
was lost and nothing leaked.

    python benchmarks/soak.py --tiny /tmp/tiny-llama [--requests 20000] [--concurrency 32] [--json PATH]
    python benchmarks/soak.py --url http://127.0.0.1:2059 --pid <server pid>

Requests are drawn from a seeded RNG: /v1/completions and /v1/chat/completions (and a few seed /instruct),
streamed or not, greedy or sampled (temperature 0.8, seeded), prompts of 2-150 words (about 5-400 tokens of
the tiny model's tokenizer), 1-64 new tokens, some with stop strings (at most 4) or n=2. A share of clients
leaves on purpose (before the headers, after k streamed events, or by a short client timeout) and a small
share sends an invalid body. Each request ends as `complete`, `error_body` (4xx/5xx with the JSON error
body; 503 with Retry-After is retried), `disconnected` (we left) or `lost` (anything else).

Fails (exit code 1) on a lost request, a 5xx other than overload (or an error event in a stream), an answer
the server cut short (finish_reason abort or error), RSS growth of --max-rss-growth-pct or more from after the
warm-up (2% of the requests) to the end, a request still running or waiting or a KV cache page still held
once the load is over, or a traceback in the server's log.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import shlex
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
from soak_traffic import Outcome, draw_plan, run_load

from jaxserver.bench import percentiles
from jaxserver.launch import start_server, wait_until_compiled

ROOT = Path(__file__).resolve().parent.parent
WARM_UP_SHARE = 0.02  # of the requests, before RSS is first read


# --- the server and its figures --------------------------------------------------------------------------


def rss_kib(pid: int | None) -> int | None:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines() if pid else []
    return next((int(line.split()[1]) for line in lines if line.startswith("VmRSS:")), None)


def engine_when_idle(url: str, timeout_s: float = 30) -> dict:
    """The engine's stats once nothing runs or waits (an abort lands within a decode call), or at the end."""
    deadline = time.monotonic() + timeout_s
    while True:
        engine = httpx.get(f"{url}/status", timeout=10).json()["engine"]
        if engine["running_requests"] == engine["waiting_requests"] == 0 or time.monotonic() > deadline:
            return engine
        time.sleep(0.5)


def make_tiny_model(folder: Path) -> Path:
    """The tests' tiny random Llama (tests/tiny.py), made once in `folder`."""
    if not (folder / "config.json").exists():
        sys.path.insert(0, str(ROOT))  # `tests` is a package of the checkout, not of the installed jaxserver
        from tests.tiny import make_hf_model

        make_hf_model(folder, "llama")
    return folder


@contextlib.contextmanager
def serving(args: argparse.Namespace) -> Iterator[tuple[str, int | None, Path | None]]:
    """(URL, server pid, log path): the --url server, or a `jaxserver serve` started here and stopped after."""
    if args.url:
        yield args.url.rstrip("/"), args.pid, None
        return
    model = make_tiny_model(Path(args.tiny)) if args.tiny else args.model
    flags = [*(["--model", str(model)] if model else []), *shlex.split(args.flags)]
    log = Path(args.log)
    log.parent.mkdir(parents=True, exist_ok=True)
    server = start_server(flags, log, timeout_s=1800)
    try:
        wait_until_compiled(server.url)
        yield server.url, server.process.pid, log
    finally:
        server.stop(timeout_s=120)


# --- the report ------------------------------------------------------------------------------------------


def latency_by_quarter(outcomes: list[Outcome]) -> list[dict]:
    ordered = sorted(outcomes, key=lambda o: o.plan.index)
    quarters: list[list[float]] = [[], [], [], []]
    for position, outcome in enumerate(ordered):
        if outcome.reply.kind == "complete":
            quarters[position * 4 // len(ordered)].append(outcome.latency_s)
    return [
        {"quarter": q + 1, "complete": len(times)} | {f"{p}_s": percentiles(times)[p] for p in ("p50", "p99")}
        for q, times in enumerate(quarters)
    ]


def sample(outcome: Outcome) -> str:
    plan = outcome.plan
    what = f"stream={plan.body['stream']} leave={plan.leave} invalid={plan.invalid}"
    return f"#{plan.index} {plan.route} ({what}): {outcome.reply.detail}"


def summarize(
    outcomes: list[Outcome], measured: list[Outcome], measured_s: float, rss: tuple, engine: dict
) -> dict:
    """The figures of a run: `outcomes` all requests, `measured` those after the warm-up (`measured_s`)."""
    replies = [o.reply for o in outcomes]
    classes = Counter(dict.fromkeys(("complete", "error_body", "disconnected", "lost"), 0))
    classes.update(r.kind for r in replies)
    start_kib, end_kib = rss
    pool = engine["kv_cache"]
    return {
        "requests": len(outcomes),
        "classes": dict(classes),
        "server_errors": sum(r.server_error for r in replies),
        "overload_retries": sum(o.retries for o in outcomes),
        "finish_reasons": dict(Counter(reason for r in replies for reason in r.finish_reasons)),
        "statuses": dict(Counter(str(r.status) for r in replies)),
        "planned_disconnects": dict(Counter(o.plan.leave for o in outcomes if o.plan.leave)),
        "planned_invalid": sum(o.plan.invalid for o in outcomes),
        "lost_samples": [sample(o) for o in outcomes if o.reply.kind == "lost"][:20],
        "unplanned_errors": [  # valid bodies refused: a limit of the server's, or a bug
            sample(o) for o in outcomes if o.reply.kind == "error_body" and not o.plan.invalid
        ][:20],
        "rss_kib": {"start": start_kib, "end": end_kib},
        "rss_growth_pct": 100 * (end_kib - start_kib) / start_kib if start_kib and end_kib else None,
        "latency_by_quarter": latency_by_quarter(measured),
        "seconds": measured_s,
        "requests_per_s": len(measured) / measured_s,
        "output_tokens_per_s": sum(o.reply.tokens for o in measured) / measured_s,
        "engine_after": {k: engine[k] for k in ("running_requests", "waiting_requests")}
        | {k: pool[k] for k in ("pages_total", "pages_free", "pages_cached")}
        # pages_free counts the cached pages nobody holds too: at rest every page is free
        | {"pages_held": pool["pages_total"] - pool["pages_free"]},
    }


def failures(report: dict, max_rss_growth_pct: float) -> list[str]:
    found = []
    if report["classes"]["lost"]:
        found.append(f"{report['classes']['lost']} requests lost")
    if report["server_errors"]:
        found.append(f"{report['server_errors']} server errors (5xx or error events)")
    cut = sum(report["finish_reasons"].get(reason, 0) for reason in ("abort", "error"))
    if cut:  # no request asks for a timeout, and a client that leaves reads no finish reason
        found.append(f"{cut} answers ended by the server (finish_reason abort or error)")
    growth = report["rss_growth_pct"]
    if growth is not None and growth >= max_rss_growth_pct:
        found.append(f"RSS grew {growth:.1f}% (limit {max_rss_growth_pct}%)")
    after = report["engine_after"]
    if after["running_requests"] or after["waiting_requests"]:
        found.append(
            f"{after['running_requests']} running, {after['waiting_requests']} waiting after the load"
        )
    if after["pages_held"]:
        found.append(f"{after['pages_held']} KV cache pages still held after the load")
    if report.get("server_log_tracebacks"):
        found.append(f"{report['server_log_tracebacks']} tracebacks in the server log")
    return found


def print_report(r: dict) -> None:
    print(
        f"\n{r['requests']} requests, concurrency {r['concurrency']}, seed {r['seed']}: {r['wall_s']:.0f} s"
    )
    print(
        f"  after the warm-up {r['requests_per_s']:.1f} requests/s, {r['output_tokens_per_s']:.0f} tokens/s"
    )
    for kind, count in r["classes"].items():
        print(f"  {kind:<13} {count:>7}")
    print(f"  server errors {r['server_errors']:>7}   (overload retries {r['overload_retries']})")
    print(f"  statuses {r['statuses']} (None: no answer); finish reasons {r['finish_reasons']}")
    if r["rss_growth_pct"] is not None:
        start, end = (r["rss_kib"][k] / 1024 for k in ("start", "end"))
        print(f"  RSS {start:.0f} -> {end:.0f} MiB ({r['rss_growth_pct']:+.2f}%)")
    else:
        print("  RSS not measured (--url without --pid)")
    print("  quarter  complete   p50 s   p99 s")
    for q in r["latency_by_quarter"]:
        print(f"  {q['quarter']:>7}  {q['complete']:>8}  {q['p50_s']:>6.2f}  {q['p99_s']:>6.2f}")
    print(f"  engine after: {r['engine_after']}")
    for line in r["lost_samples"]:
        print(f"  lost: {line}")
    for line in r["unplanned_errors"]:
        print(f"  refused: {line}")
    print("FAIL: " + "; ".join(r["failures"]) if r["failures"] else "PASS")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="for `jaxserver serve` (default: its default model)")
    parser.add_argument("--tiny", metavar="DIR", help="serve the tests' tiny random Llama, made in DIR")
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--disconnect-share", type=float, default=0.1)
    parser.add_argument("--invalid-share", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--flags", default="--no-ui --max-length 1024 --max-num-seqs 16")
    parser.add_argument("--max-rss-growth-pct", type=float, default=5.0)
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--log", default=str(ROOT / "benchmarks/results/soak-serve.log"), help="server log")
    parser.add_argument("--url", help="drive this running server instead of starting one")
    parser.add_argument("--pid", type=int, help="with --url: the server's pid, to read its RSS")
    return parser.parse_args(argv)


def soak(args: argparse.Namespace) -> dict:
    """Run the soak; the report, its `failures` empty when every check passed."""
    started = time.monotonic()
    rng = random.Random(args.seed)
    plans = [draw_plan(rng, i, args.disconnect_share, args.invalid_share) for i in range(args.requests)]
    warm = max(1, int(WARM_UP_SHARE * len(plans)))
    with serving(args) as (url, pid, log):
        warm_outcomes = asyncio.run(run_load(url, plans[:warm], args.concurrency, False))
        start_kib = rss_kib(pid)
        measured_from = time.monotonic()
        measured = asyncio.run(run_load(url, plans[warm:], args.concurrency, True))
        measured_s = time.monotonic() - measured_from
        engine = engine_when_idle(url)
        end_kib = rss_kib(pid)
    report = summarize(warm_outcomes + measured, measured, measured_s, (start_kib, end_kib), engine)
    report |= {"concurrency": args.concurrency, "seed": args.seed}
    if log is not None:
        report["server_log_tracebacks"] = log.read_text(errors="replace").count("Traceback")
    report["failures"] = failures(report, args.max_rss_growth_pct)
    report["wall_s"] = time.monotonic() - started  # the server's start and stop included
    return report


def main() -> None:
    args = parse_args(None)
    report = soak(args)
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    sys.exit(1 if report["failures"] else 0)


if __name__ == "__main__":
    main()

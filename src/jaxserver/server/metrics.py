"""Prometheus metrics of one app: requests by route and status, tokens, latencies, engine load.

Each app has its own `CollectorRegistry` (tests build many apps in one process; the global registry would
refuse the second set of names). Requests are counted by `RequestCounter`, a plain ASGI middleware, so
that answers given before routing (401, 413) are counted too; tokens and latencies are recorded by the
`EngineClient` that reads every chunk.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from jaxserver.engine.request import GenerationChunk
from jaxserver.server.asgi import HttpMiddleware

TTFT_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self, engine_stats: Callable[[], dict[str, Any] | None]):
        """`engine_stats` returns the engine's `stats()` (None while no engine runs); read at scrape time."""
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "jaxserver_requests",
            "HTTP requests answered, by route and status code.",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "jaxserver_prompt_tokens", "Prompt tokens of submitted requests.", registry=self.registry
        )
        self.generation_tokens = Counter(
            "jaxserver_generation_tokens", "Tokens generated and sent to clients.", registry=self.registry
        )
        self.time_to_first_token = Histogram(
            "jaxserver_time_to_first_token_seconds",
            "From submitting a request to the engine until its first token arrives.",
            buckets=TTFT_BUCKETS_S,
            registry=self.registry,
        )
        self.inter_token_latency = Histogram(
            "jaxserver_inter_token_latency_seconds",
            "Time between two chunks of a request, divided over the tokens of the later one.",
            buckets=ITL_BUCKETS_S,
            registry=self.registry,
        )

        def stat(name: str) -> Callable[[], float]:
            return lambda: float((engine_stats() or {}).get(name, 0))

        for name, key, text in (
            ("jaxserver_waiting_requests", "waiting_requests", "Requests waiting to run."),
            ("jaxserver_running_requests", "running_requests", "Requests running (decoded together)."),
            ("jaxserver_max_num_seqs", "max_num_seqs", "Requests that may run at once."),
        ):
            Gauge(name, text, registry=self.registry).set_function(stat(key))
        self.registry.register(EngineCollector(engine_stats))

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def observe_chunk(
        self, chunk: GenerationChunk, previous_at: float | None, submitted_at: float, now: float
    ):
        """Record one chunk of a request that was submitted at `submitted_at` and whose previous chunk with
        tokens arrived at `previous_at` (None: this is its first)."""
        tokens = len(chunk.token_ids)
        if not tokens:
            return
        self.generation_tokens.inc(tokens)
        if previous_at is None:  # any other tokens of a first chunk arrived with the first one
            self.time_to_first_token.observe(now - submitted_at)
            return
        latency = (now - previous_at) / tokens
        for _ in range(tokens):
            self.inter_token_latency.observe(latency)


# The engine's StepTotals as counters: (field, metric name, help).
STEP_COUNTERS = (
    ("prefill_seconds", "jaxserver_engine_prefill_seconds", "Engine time in steps that carry prompt tokens."),
    ("prefill_calls", "jaxserver_engine_prefill_calls", "Steps that carried prompt tokens."),
    ("prompt_tokens", "jaxserver_engine_prompt_tokens", "Prompt tokens written into the KV cache."),
    (
        "prompt_tokens_computed",
        "jaxserver_engine_prompt_tokens_computed",
        "Prompt tokens computed, bucket padding included.",
    ),
    (
        "prompt_tokens_reused",
        "jaxserver_engine_prompt_tokens_reused",
        "Prompt tokens found in the KV cache (prefix caching) instead of prefilled.",
    ),
    (
        "tokens_recomputed",
        "jaxserver_engine_tokens_recomputed",
        "Tokens computed again after their request was preempted for want of KV cache pages.",
    ),
    ("decode_seconds", "jaxserver_engine_decode_seconds", "Engine time in calls of decode tokens only."),
    ("decode_calls", "jaxserver_engine_decode_calls", "Calls of decode tokens only."),
    ("decode_steps", "jaxserver_engine_decode_steps", "Forward passes of the decode batch."),
    ("decode_tokens", "jaxserver_engine_decode_tokens", "Tokens generated by decode steps."),
    (
        "decode_rows_computed",
        "jaxserver_engine_decode_rows_computed",
        "Rows computed by decode steps, idle padding rows included.",
    ),
)


ENGINE_COUNTERS = (
    ("preemptions", "jaxserver_preemptions", "Running requests preempted for want of KV cache pages."),
    (
        "prefix_cache_hit_pages",
        "jaxserver_prefix_cache_hit_pages",
        "KV cache pages found in the prefix cache.",
    ),
)
POOL_GAUGES = (
    ("pages_total", "jaxserver_kv_cache_pages", "Pages of the KV cache pool."),
    ("pages_free", "jaxserver_kv_cache_pages_free", "Pages no running request holds (cached ones included)."),
    ("pages_cached", "jaxserver_kv_cache_pages_cached", "Pages in the prefix cache, held or free."),
)


class EngineCollector:
    """Reads the engine's step totals, counters and pool at scrape time (a custom collector: they are counted by the engine
    thread, not incremented here)."""

    def __init__(self, engine_stats: Callable[[], dict[str, Any] | None]):
        self.engine_stats = engine_stats

    def collect(self):
        stats = self.engine_stats() or {}
        totals = stats.get("step_totals", {})
        for key, name, text in STEP_COUNTERS:
            yield CounterMetricFamily(name, text, value=totals.get(key, 0))
        for key, name, text in ENGINE_COUNTERS:
            yield CounterMetricFamily(name, text, value=stats.get(key, 0))
        pool = stats.get("kv_cache", {})
        for key, name, text in POOL_GAUGES:
            yield GaugeMetricFamily(name, text, value=pool.get(key, 0))


class RequestCounter(HttpMiddleware):
    """Counts every HTTP answer by route (its path template) and status code."""

    def __init__(self, app, metrics: Metrics):
        super().__init__(app)
        self.metrics = metrics

    async def handle(self, scope, receive, send) -> None:
        answered = False

        async def counting_send(message) -> None:
            nonlocal answered
            if message["type"] == "http.response.start" and not answered:
                answered = True
                self.metrics.requests.labels(_endpoint(scope), str(message["status"])).inc()
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except Exception:
            if not answered:  # the outermost error handler answers 500 after we return
                self.metrics.requests.labels(_endpoint(scope), "500").inc()
            raise


def _endpoint(scope) -> str:
    """The matched route's path template; for answers given before routing (401, 413), the path when the
    API documents it, else "unmatched" (so that scanners of random paths do not grow the label set)."""
    route = scope.get("route")
    if route is not None and hasattr(route, "path"):
        return route.path
    app = scope.get("app")
    documented = app.openapi()["paths"] if hasattr(app, "openapi") else {}  # FastAPI caches it
    return scope["path"] if scope["path"] in documented else "unmatched"

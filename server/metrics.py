"""Prometheus metrics of one worker: request outcomes and latencies as they happen, engine state at scrape time.

Served over HTTP by gevent's WSGI server on the worker's hub, so a scrape
reads the engine from the only thread that changes it. Each worker has its own
registry (and port): nothing is process-global.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator

import gevent
import gevent.pool
import greenlet
from gevent.pywsgi import WSGIServer
from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ringlm.server.engine import GenerationResult

# Seconds; from a fast cached prompt to a long queue wait.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
PER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)
MAX_SCRAPERS = 16          # metrics connections served at once (Prometheus needs one per scrape)
SCRAPE_TIMEOUT_S = 10.0


class EngineCollector(Collector):
    """Gauges and counters read from `Service.stats()` when Prometheus scrapes."""

    GAUGES = {
        "running": "Requests running (holding a KV-cache slot).",
        "slots": "KV-cache slots: requests that can run at once.",
        "slots_busy": "KV-cache slots in use.",
        "slots_cached_prefixes": "Free slots still holding a reusable prompt prefix.",
        "kv_cache_bytes": "Memory of the KV cache.",
        "tokens_per_second": "Tokens generated per second over the last 10 s.",
        "open_streams": "Streams opened and not yet finished or reaped.",
        "connections": "Open client connections.",
        "draining": "1 while the worker drains after SIGTERM.",
        "ready": "1 while the worker takes new work (engine loop running and not stuck, not draining).",
    }
    COUNTERS = {
        "prefix_cache_lookups": "Admissions that looked for a cached prompt prefix.",
        "prefix_cache_hits": "Admissions that reused a cached prompt prefix.",
        "prefix_cache_hit_tokens": "Prompt tokens whose KV came from the prefix cache.",
        "prefix_cache_evictions": "Cached prefixes dropped to make room.",
        "preemptions": "Running requests paused for a higher priority.",
        "steps": "Engine steps (model calls).",
    }

    def __init__(self, stats: Callable[[], dict]):
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self.stats()
        queue = GaugeMetricFamily("ringlm_queue_depth", "Requests waiting for a slot, by priority.",
                                  labels=["priority"])
        for priority, depth in stats["waiting"].items():
            queue.add_metric([priority], depth)
        yield queue
        for name, text in self.GAUGES.items():
            yield GaugeMetricFamily(f"ringlm_{name}", text, value=float(stats[name]))
        for name, text in self.COUNTERS.items():
            yield CounterMetricFamily(f"ringlm_{name}", text, value=stats[name])


class GreenletCollector(Collector):
    """`ringlm_greenlets`: the worker's unfinished greenlets, for leak hunting (`make soak` watches it)."""

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("ringlm_greenlets", "Greenlets not yet finished in the worker process "
                                "(connections, call watchers, the engine loop, scrapes...), counted at scrape.",
                                value=count_greenlets())


def count_greenlets() -> int:
    """The greenlets the hub runs that have not finished. gevent keeps no registry of them, but each holds
    the hub as its parent, so the garbage collector finds them among the hub's referrers: one pass over
    the process's objects in C, milliseconds to tens of them with torch loaded, on the hub. Affordable
    once a scrape; not in `status`, which every ring client polls each second."""
    return sum(isinstance(o, greenlet.greenlet) and not o.dead for o in gc.get_referrers(gevent.get_hub()))


class Metrics:
    """The handler reports each finished or refused request here; `serve` exposes everything."""

    def __init__(self, stats: Callable[[], dict]):
        self.registry = CollectorRegistry()
        self.requests = Counter("ringlm_requests", "Generation requests by outcome.", ["outcome"],
                                registry=self.registry)
        self.prompt_tokens = Counter("ringlm_prompt_tokens", "Prompt tokens of finished requests.",
                                     registry=self.registry)
        self.cached_prompt_tokens = Counter("ringlm_cached_prompt_tokens",
                                            "Prompt tokens served from the prefix cache.", registry=self.registry)
        self.generated_tokens = Counter("ringlm_generated_tokens", "Tokens generated.", registry=self.registry)
        self.queue_time = Histogram("ringlm_queue_seconds", "Arrival to admission.",
                                    buckets=LATENCY_BUCKETS, registry=self.registry)
        self.ttft = Histogram("ringlm_time_to_first_token_seconds", "Arrival to the first new token.",
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.per_token = Histogram("ringlm_time_per_output_token_seconds",
                                   "Mean time per new token after the first, per request.",
                                   buckets=PER_TOKEN_BUCKETS, registry=self.registry)
        self.duration = Histogram("ringlm_request_seconds", "Arrival to the end of a request.",
                                  buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(EngineCollector(stats))
        self.registry.register(GreenletCollector())
        self.server: WSGIServer | None = None

    def observe_result(self, result: GenerationResult) -> None:
        self.requests.labels(result.finish_reason.value).inc()
        self.prompt_tokens.inc(result.prompt_tokens)
        self.cached_prompt_tokens.inc(result.cached_prompt_tokens)
        self.generated_tokens.inc(result.completion_tokens)
        self.duration.observe(result.total_ms / 1000)
        if result.completion_tokens:
            self.queue_time.observe(result.queue_ms / 1000)
            self.ttft.observe(result.ttft_ms / 1000)
        if result.completion_tokens > 1:
            self.per_token.observe((result.total_ms - result.ttft_ms) / (result.completion_tokens - 1) / 1000)

    def observe_refusal(self, outcome: str) -> None:
        """A request turned away before it was queued ("invalid", "overloaded")."""
        self.requests.labels(outcome).inc()

    def serve(self, host: str, port: int) -> WSGIServer:
        """Serve /metrics (any path, in fact) on host:port from the hub, to at most MAX_SCRAPERS clients at
        once (more wait in the backlog), each given SCRAPE_TIMEOUT_S to send its request and take the page."""
        self.server = BoundedWSGIServer((host, port), make_wsgi_app(self.registry), log=None,
                                        spawn=gevent.pool.Pool(MAX_SCRAPERS))
        self.server.start()
        return self.server


class BoundedWSGIServer(WSGIServer):
    """gevent's WSGI server with a time limit on every socket operation: a scraper that opens a
    connection and sends nothing would otherwise hold its greenlet for ever."""

    def handle(self, sock, address):
        sock.settimeout(SCRAPE_TIMEOUT_S)
        return super().handle(sock, address)

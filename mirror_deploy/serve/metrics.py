"""The server's Prometheus figures (`GET /metrics`), in a registry of its own so that two servers in one
process (tests, the serve benchmark) never share counters."""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PREFIX = "mirror_deploy"


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, queue_depth, busy):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(f"{PREFIX}_requests", "HTTP requests to the completion endpoints, by outcome",
                                ["endpoint", "status"], registry=r)
        self.finished = Counter(f"{PREFIX}_generations", "Generations that ran, by how they ended",
                                ["finish_reason"], registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.completion_tokens = Counter(f"{PREFIX}_completion_tokens", "Tokens generated", registry=r)
        self.tokens_per_s = Gauge(f"{PREFIX}_last_tokens_per_second", "Decode speed of the last generation",
                                  registry=r)
        self.reuse = Gauge(f"{PREFIX}_last_reuse_rate", "Mirror: steps whose next window was pre-computed, "
                           "last generation", registry=r)
        self.accepted = Gauge(f"{PREFIX}_last_accepted_per_target_forward", "Tokens per target forward, "
                              "last generation", registry=r)
        self.duration = Histogram(f"{PREFIX}_generation_seconds", "Engine time per generation", registry=r,
                                  buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
        self.queue_wait = Histogram(f"{PREFIX}_queue_wait_seconds", "Time a request waited for the engine",
                                    registry=r, buckets=(0.001, 0.01, 0.1, 0.5, 1, 5, 10, 30, 60, 300))
        Gauge(f"{PREFIX}_queue_depth", "Requests waiting for the engine", registry=r).set_function(queue_depth)
        Gauge(f"{PREFIX}_engine_busy", "1 while the engine generates", registry=r).set_function(busy)

    def record_generation(self, finish_reason: str, summary: dict, seconds: float, waited: float) -> None:
        self.finished.labels(finish_reason).inc()
        self.prompt_tokens.inc(summary["prompt_tokens"])
        self.completion_tokens.inc(summary["new_tokens"])
        self.tokens_per_s.set(summary["tokens_per_s"])
        self.accepted.set(summary["mean_accepted_tokens"])
        if summary.get("reuse_rate") is not None:
            self.reuse.set(summary["reuse_rate"])
        self.duration.observe(seconds)
        self.queue_wait.observe(waited)

    def render(self) -> bytes:
        return generate_latest(self.registry)

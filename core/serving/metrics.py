"""`/metrics` through prometheus-client: requests by route and code, latency,
batch sizes, queue depth, tokens, and what model is served.

With `--workers N` every worker process writes its values to files in
PROMETHEUS_MULTIPROC_DIR (set by `mk serve`), and any worker answering a scrape
sums them all: prometheus-client's multiprocess mode."""

from __future__ import annotations

import os

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    def __init__(self, model: str, info: dict[str, str]):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        reg = self.registry
        self.requests = Counter("mk_requests", "HTTP requests answered, by route and status code.",
                                ["route", "code"], registry=reg)
        self.latency = Histogram("mk_request_duration_seconds", "Time to answer an inference request.",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=reg)
        self.batch_size = Histogram("mk_batch_size", "Inputs per runtime call (dynamic batching).",
                                    buckets=BATCH_BUCKETS, registry=reg)
        self.queue_depth = Gauge("mk_queue_depth", "Inputs waiting for a batch.", registry=reg,
                                 multiprocess_mode="livesum")
        self.tokens = Counter("mk_tokens", "Real (unpadded) tokens run through the model.", registry=reg)
        self.samples = Counter("mk_inference_samples", "Inputs classified.", registry=reg)
        self.ready = Gauge("mk_model_ready", "Whether the model is loaded and answering.", ["model"],
                           registry=reg, multiprocess_mode="livemin")
        self.model_info = Gauge("mk_model_info", "The served model (value 1).", ["model", *info],
                                registry=reg, multiprocess_mode="liveall")
        self.model_info.labels(model=model, **info).set(1)
        self.model = model
        self._children: dict = {}

    def answered(self, route: str, code: int, seconds: float | None) -> None:
        """One request answered (`seconds` for the timed routes)."""
        # labels() looks its child up under a lock on every call: each child is looked up once
        children = self._children
        if (route, code) not in children:
            children[route, code] = self.requests.labels(route=route, code=str(code))
        children[route, code].inc()
        if seconds is not None:
            if route not in children:
                children[route] = self.latency.labels(route=route)
            children[route].observe(seconds)

    def batch(self, rows: int, tokens: int) -> None:
        self.batch_size.observe(rows)
        self.samples.inc(rows)
        self.tokens.inc(tokens)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

        registry = self.registry
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST

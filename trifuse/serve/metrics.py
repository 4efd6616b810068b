"""Prometheus metrics of one replica, through ``prometheus-client`` (``GET /metrics``).

Names follow Prometheus' conventions (``_total`` counters, ``_seconds`` histograms) under a
``trifuse_`` prefix, as text-embeddings-inference uses ``te_``. Each replica keeps its own
registry; with ``--replicas`` > 1 a scrape reads the replica that answers it.
"""

from __future__ import annotations

from trifuse.engine.extras import require

_LATENCY = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120)
_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384)


class Metrics:
    """The counters and histograms a replica updates; :meth:`render` is the scrape's body."""

    def __init__(self, model: str):
        require("trifuse serve's /metrics", "serve", "prometheus_client")
        import prometheus_client as pc

        self._pc = pc
        self.registry = r = pc.CollectorRegistry()
        self.requests = pc.Counter("trifuse_requests", "HTTP requests answered, by route and status",
                                   ["route", "status"], registry=r)
        self.in_flight = pc.Gauge("trifuse_requests_in_flight", "requests being worked on", registry=r)
        self.queue = pc.Histogram("trifuse_request_queue_seconds", "from arrival to the start of its batch",
                                  buckets=_LATENCY, registry=r)
        self.compute = pc.Histogram("trifuse_batch_compute_seconds", "one batch's pipeline work", buckets=_LATENCY,
                                    registry=r)
        self.latency = pc.Histogram("trifuse_request_seconds", "from arrival to the answer, by route", ["route"],
                                    buckets=_LATENCY, registry=r)
        self.batch_requests = pc.Histogram("trifuse_batch_requests", "requests per batch", buckets=_SIZES, registry=r)
        self.batch_inputs = pc.Histogram("trifuse_batch_inputs", "inputs per batch", buckets=_SIZES, registry=r)
        self.prompt_tokens = pc.Counter("trifuse_prompt_tokens", "tokens of the inputs of OpenAI-route requests",
                                        registry=r)
        self.generated_tokens = pc.Counter("trifuse_generated_tokens", "tokens generated", registry=r)
        self.rejected = pc.Counter("trifuse_rejected_requests", "requests refused before any work, by reason",
                                   ["reason"], registry=r)
        pc.Info("trifuse_model", "the served model", registry=r).info({"model": model})
        #: a callable returning the generation engine's stats (``GenerationEngine.stats()``) or None
        self.engine_stats = None
        for key, name, doc in (("running", "trifuse_engine_running_sequences", "sequences in the engine's steps"),
                               ("waiting", "trifuse_engine_waiting_sequences", "sequences waiting for the engine"),
                               ("kv_blocks_used", "trifuse_kv_blocks_used", "KV-pool blocks in use"),
                               ("kv_blocks_total", "trifuse_kv_blocks_total", "KV-pool blocks")):
            pc.Gauge(name, doc, registry=r).set_function(lambda key=key: self._engine_value(key))

    def _engine_value(self, key: str) -> float:
        stats = self.engine_stats() if self.engine_stats is not None else None
        return float(stats[key]) if stats else 0.0

    def batch(self, requests, started: float, seconds: float) -> None:
        self.batch_requests.observe(len(requests))
        self.batch_inputs.observe(sum(len(r.inputs) if isinstance(r.inputs, list) else 1 for r in requests))
        self.compute.observe(seconds)
        for r in requests:
            self.queue.observe(max(0.0, started - r.arrived))

    def render(self) -> tuple[bytes, str]:
        return self._pc.generate_latest(self.registry), self._pc.CONTENT_TYPE_LATEST

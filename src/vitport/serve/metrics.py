"""The server's Prometheus metrics, in a registry of its own (two apps in one process, as in
tests, never share counters)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    """Requests and images by outcome, queue depth, batch sizes, queue wait, device time, and
    errors by reason."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "vitport_requests",
            "HTTP requests by endpoint and outcome",
            ["endpoint", "outcome"],
            registry=r,
        )
        self.images = Counter("vitport_images", "Images by outcome", ["outcome"], registry=r)
        self.errors = Counter("vitport_errors", "Errors by reason", ["reason"], registry=r)
        self.queue_depth = Gauge(
            "vitport_queue_depth", "Images admitted and not yet on a device", registry=r
        )
        self.in_flight = Gauge("vitport_requests_in_flight", "Requests being served", registry=r)
        self.batch_size = Histogram(
            "vitport_batch_size", "Images per device batch", buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_wait = Histogram(
            "vitport_queue_wait_seconds",
            "Seconds a decoded image waited for its device batch",
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.device_time = Histogram(
            "vitport_device_seconds",
            "Device time of one batch (device events or synchronised)",
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.ready = Gauge("vitport_ready", "1 when the server takes traffic", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


__all__ = ["CONTENT_TYPE", "Metrics"]

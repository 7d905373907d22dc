"""Prometheus metrics of one control-plane replica, on a registry the composition root owns."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

BATCH_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500)
FLUSH_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class ControlMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "edgelm_control_http_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=r,
        )
        self.inbound = Counter(
            "edgelm_control_messages_received",
            "Messages received from devices, by channel",
            ["channel"],
            registry=r,
        )
        self.refused = Counter(
            "edgelm_control_messages_refused",
            "Messages dropped because they broke the contract, by reason code",
            ["code"],
            registry=r,
        )
        self.duplicates = Counter(
            "edgelm_control_messages_duplicate",
            "Messages delivered again (QoS 1), by channel",
            ["channel"],
            registry=r,
        )
        self.stored = Counter(
            "edgelm_control_messages_stored",
            "Messages stored, by type",
            ["type"],
            registry=r,
        )
        self.batch_size = Histogram(
            "edgelm_control_ingest_batch_messages",
            "Messages per ingest transaction",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.flush_seconds = Histogram(
            "edgelm_control_ingest_flush_seconds",
            "Time to store one ingest batch",
            buckets=FLUSH_BUCKETS_S,
            registry=r,
        )
        self.ingest_failures = Counter(
            "edgelm_control_ingest_failures",
            "Ingest batches the store refused or could not take",
            registry=r,
        )
        self.acks_sent = Counter(
            "edgelm_control_acks_sent",
            "End-to-end acknowledgements published to devices (message ids)",
            registry=r,
        )
        self.desired_issued = Counter(
            "edgelm_control_desired_issued", "Desired states signed", registry=r
        )
        self.desired_published = Counter(
            "edgelm_control_desired_published", "Desired states the broker took", registry=r
        )
        self.jobs_published = Counter(
            "edgelm_control_jobs_published", "Remote jobs the broker took", registry=r
        )
        self.broker_connected = Gauge(
            "edgelm_control_broker_connected", "1 while connected to the broker", registry=r
        )
        self.sse_clients = Gauge(
            "edgelm_control_sse_clients", "Open server-sent-event streams", registry=r
        )
        self.device_transitions = Counter(
            "edgelm_control_rollout_device_transitions",
            "Rollout rows moved, by new state",
            ["state"],
            registry=r,
        )
        self.service_up = Gauge(
            "edgelm_control_service_up",
            "1 while a long-running service runs without failing",
            ["service"],
            registry=r,
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

"""Prometheus metrics of one agent, on a registry the composition root owns (no globals)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from edgelm_agent.inference.scheduler import SchedulerHooks
from edgelm_agent.inference.types import Finished
from edgelm_agent.sync.telemetry import TelemetryWindow

# Buckets sized for small models on edge CPUs: TTFT from ~5 ms to tens of seconds on a Pi.
TTFT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
TOKENS_PER_S_BUCKETS = (1, 2, 5, 10, 20, 35, 50, 75, 100, 150, 200, 300, 500)
WAIT_BUCKETS_S = (0.001, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60)


class AgentMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "edgelm_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.tokens_generated = Counter(
            "edgelm_tokens_generated", "Completion tokens generated", ["model"], registry=r
        )
        self.prompt_tokens = Counter(
            "edgelm_prompt_tokens", "Prompt tokens processed", ["model"], registry=r
        )
        self.time_to_first_token = Histogram(
            "edgelm_time_to_first_token_seconds",
            "From request arrival to the first generated token",
            ["model"],
            buckets=TTFT_BUCKETS_S,
            registry=r,
        )
        self.tokens_per_second = Histogram(
            "edgelm_tokens_per_second",
            "Decode speed of each generation",
            ["model"],
            buckets=TOKENS_PER_S_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("edgelm_queue_depth", "Requests waiting for the model", registry=r)
        self.queue_wait = Histogram(
            "edgelm_queue_wait_seconds",
            "Time a request waited for the model",
            buckets=WAIT_BUCKETS_S,
            registry=r,
        )
        self.model_load = Gauge(
            "edgelm_model_load_seconds",
            "How long the active model took to load",
            ["model"],
            registry=r,
        )
        self.models_loaded = Gauge(
            "edgelm_models_loaded",
            "Chat and completion models in memory: the active one and those loaded on demand",
            registry=r,
        )
        self.model_loads = Counter(
            "edgelm_model_loads",
            "Loads of models on demand, by outcome (loaded, refused, failed)",
            ["outcome"],
            registry=r,
        )
        self.model_unloads = Counter(
            "edgelm_model_unloads",
            "Models loaded on demand that were unloaded, by reason",
            ["reason"],
            registry=r,
        )
        self.generation_errors = Counter(
            "edgelm_generation_errors",
            "Generations that failed in the runtime",
            ["model"],
            registry=r,
        )

        #: What the fleet's telemetry batches are made of (see edgelm_agent.sync.telemetry).
        self.window = TelemetryWindow()
        self.sync_connected = Gauge(
            "edgelm_sync_connected", "1 while connected to the fleet's broker", registry=r
        )
        self.desired_sequence = Gauge(
            "edgelm_desired_sequence",
            "Sequence of the last desired state this device applied",
            registry=r,
        )
        self.outbox_messages = Gauge(
            "edgelm_outbox_messages",
            "Messages waiting in the outbox for the control plane, by kind",
            ["kind"],
            registry=r,
        )
        self.services_up = Gauge(
            "edgelm_service_up",
            "1 while a long-running service (jobs, sync) runs, 0 while it waits to restart",
            ["service"],
            registry=r,
        )
        self.services_restarted = Counter(
            "edgelm_service_restarts",
            "Times a service failed and was restarted",
            ["service"],
            registry=r,
        )

    # ServiceObserver (see edgelm_agent.services)
    def service_up(self, name: str, up: bool) -> None:
        self.services_up.labels(name).set(1 if up else 0)

    def service_restarted(self, name: str) -> None:
        self.services_restarted.labels(name).inc()

    def scheduler_hooks(self, model_id: str) -> SchedulerHooks:
        tokens = self.tokens_generated.labels(model_id)
        speed = self.tokens_per_second.labels(model_id)

        window = self.window

        def on_finished(finished: Finished) -> None:
            tokens.inc(finished.completion_tokens)
            if finished.tokens_per_s is not None:
                speed.observe(finished.tokens_per_s)
            window.finished(finished)

        def on_queue_depth(depth: int) -> None:
            self.queue_depth.set(depth)
            window.queue_depth(depth)

        def on_failed(exc: BaseException) -> None:
            errors.inc()
            window.failed()

        errors = self.generation_errors.labels(model_id)
        return SchedulerHooks(
            on_queue_depth=on_queue_depth,
            on_queue_wait=self.queue_wait.observe,
            on_finished=on_finished,
            on_failed=on_failed,
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

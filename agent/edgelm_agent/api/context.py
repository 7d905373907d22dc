"""What the handlers need, built by the composition root and stored on the application."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import web

from edgelm_agent.api.access import HttpAccessPolicy
from edgelm_agent.api.rate_limit import ClientLimiter
from edgelm_agent.jobs.outbox import Outbox
from edgelm_agent.metrics import AgentMetrics
from edgelm_agent.model_manager import ModelManager
from edgelm_agent.services import Supervisor
from edgelm_agent.serving import ModelHost


class SyncStatus(Protocol):
    def status(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class ApiContext:
    host: ModelHost
    metrics: AgentMetrics
    max_body_bytes: int
    #: Applied to requests that arrive over TCP; ``None`` when HTTP is disabled.
    http_policy: HttpAccessPolicy | None
    #: Activation and registry changes; ``None`` in tests that serve a bare model.
    models: ModelManager | None = None
    #: The long-running services, for /readyz; ``None`` in tests that serve a bare model.
    services: Supervisor | None = None
    #: A request body must arrive within this many seconds of its headers.
    body_timeout_s: float = 30.0
    #: Messages waiting for the control plane; ``None`` in tests that serve a bare model.
    outbox: Outbox | None = None
    #: Fleet sync, on an enrolled device; ``None`` on a standalone one.
    sync: SyncStatus | None = None
    #: Handler tasks still running; the daemon gives them the grace period at shutdown.
    inflight: set[asyncio.Task[Any]] = field(default_factory=set)


API_CONTEXT = web.AppKey("api_context", ApiContext)
#: Per-client rate and concurrency limits of the HTTP listener; absent when HTTP is off.
CLIENT_LIMITER = web.AppKey("client_limiter", ClientLimiter)

# What the middleware records about each request, for handlers and for its log line.
REQUEST_ID = web.RequestKey("request_id", str)
STARTED = web.RequestKey("started", float)  # time.perf_counter() at arrival
LOG_FACTS = web.RequestKey("log_facts", dict[str, Any])
#: Set once a handler has sent headers; the middleware must never send a second response.
PREPARED_RESPONSE = web.RequestKey("prepared_response", web.StreamResponse)
#: An ``Expect`` header other than ``100-continue``, set aside for the middleware to refuse.
UNKNOWN_EXPECTATION = web.RequestKey("unknown_expectation", str)
#: The request's ``Origin``, once the access policy has allowed it: its responses, errors and
#: streams included, carry CORS headers for it.
ALLOWED_ORIGIN = web.RequestKey("allowed_origin", str)

"""What the HTTP handlers reach: one value in the application, built by the composition root."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from aiohttp import web

from edgelm_control.api.auth import TokenChecker
from edgelm_control.clock import Clock
from edgelm_control.fleet.ports import FleetPublisher
from edgelm_control.hub import FleetHub
from edgelm_control.jobs.service import RemoteJobs
from edgelm_control.metrics import ControlMetrics
from edgelm_control.repository.service import RepositoryService
from edgelm_control.rollouts.engine import RolloutEngine
from edgelm_control.store import Store


@dataclass
class ApiContext:
    fleet: str
    store: Store
    engine: RolloutEngine
    jobs: RemoteJobs
    repository: RepositoryService
    link: FleetPublisher
    hub: FleetHub
    metrics: ControlMetrics
    tokens: TokenChecker
    clock: Clock
    max_body_bytes: int
    max_upload_bytes: int
    sse_heartbeat_s: float
    device_timeout_s: int
    pending_expiry_s: int
    draining: bool = False
    inflight: set[asyncio.Task[object]] = field(default_factory=set)


CONTEXT = web.AppKey("edgelm_control_context", ApiContext)
REQUEST_ID = web.RequestKey("edgelm_request_id", str)

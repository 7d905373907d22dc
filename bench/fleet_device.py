"""One simulated fleet device for ``bench/fleet.py``: the agent's own sync stack, in-process.

:class:`SimDevice` builds what :class:`edgelm_agent.daemon.Daemon` builds for an enrolled
agent, from the same classes and in the same order: its registry (``registry_for``), the
:class:`~edgelm_agent.model_manager.ModelManager` and :class:`~edgelm_agent.serving.ModelHost`,
the job database, outbox and worker, and :class:`~edgelm_agent.sync.service.SyncService`,
run under the agent's :class:`~edgelm_agent.services.Supervisor`. So each device speaks the
protocol over its own MQTT session, downloads and verifies the model through its registry
and activates it with the health check on llama.cpp, from its own state directory.

What it leaves out is what a rollout never touches: the HTTP and Unix-socket listeners and
the signal handling of the daemon. Many devices share one process and one event loop, which
a real fleet does not do; ``bench/fleet.py`` says what that changes.

:func:`enroll` is ``edgelm agent enroll BUNDLE --state-dir DIR`` without the subprocess: the
same three calls (read the bundle, write the enrollment, adopt the fleet's trust root).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from pathlib import Path

from edgelm_agent.api.errors import error_fields
from edgelm_agent.config import AgentConfig, resolve_config, with_enrollment
from edgelm_agent.enrollment import Enrollment, read_bundle, write_enrollment
from edgelm_agent.jobs.database import Database
from edgelm_agent.jobs.outbox import Outbox, OutboxLimits
from edgelm_agent.jobs.worker import JobWorker
from edgelm_agent.metrics import AgentMetrics
from edgelm_agent.model_manager import ModelManager
from edgelm_agent.registry.factory import registry_for
from edgelm_agent.services import Supervisor
from edgelm_agent.serving import ModelHost
from edgelm_agent.state_dir import prepare_state_dir
from edgelm_agent.sync.service import SyncService

#: How long one device's stop may take before the process gives up on it.
STOP_TIMEOUT_S = 30.0


@dataclasses.dataclass(frozen=True)
class DeviceSettings:
    """The agent settings every simulated device runs with (the rest are the defaults)."""

    #: llama.cpp threads: one, since a few hundred devices share two cores.
    threads: int = 1
    telemetry_interval_s: float = 60.0

    def config(self, state_dir: Path) -> AgentConfig:
        """The configuration ``edgelm agent run --state-dir DIR`` would resolve."""
        flags = {
            "state_dir": str(state_dir),
            "threads": self.threads,
            "telemetry_interval_s": self.telemetry_interval_s,
            "http": "off",
        }
        return with_enrollment(resolve_config(flags=flags))


def enroll(state_dir: Path, bundle: Path) -> Enrollment:
    """Install ``bundle`` in ``state_dir``, as ``edgelm agent enroll`` does (the fleet's
    repository must be reachable: enrolling refreshes its signed metadata)."""
    enrollment, root = read_bundle(bundle)
    base = resolve_config(flags={"state_dir": str(state_dir)})
    prepare_state_dir(base.state_dir)
    with registry_for(base).locked():
        write_enrollment(base.state_dir, enrollment, root)
        registry_for(with_enrollment(base)).adopt_trust_root(root)
    return enrollment


class SimDevice:
    """One enrolled agent's registry, models, jobs and fleet sync, without its listeners."""

    def __init__(self, state_dir: Path, settings: DeviceSettings) -> None:
        config = settings.config(state_dir)
        if config.enrollment is None:
            raise RuntimeError(f"{state_dir} is not enrolled")
        self.config = config
        self.device_id = config.enrollment.device_id
        prepare_state_dir(config.state_dir)
        self.metrics = AgentMetrics()
        self.host = ModelHost()
        self.registry = registry_for(config)
        self.models = ModelManager.from_config(config, self.registry, self.host, self.metrics)
        self.db = Database(config.state_dir / "agent.db")
        worker = JobWorker(
            self.db,
            self.host,
            retention_s=config.jobs_retention_s,
            retention_count=config.jobs_retention_count,
            describe_error=error_fields,
        )
        outbox = Outbox(
            self.db, OutboxLimits(config.outbox_telemetry_max, config.outbox_durable_max_bytes)
        )
        self.sync = SyncService(
            config,
            config.enrollment,
            db=self.db,
            outbox=outbox,
            registry=self.registry,
            models=self.models,
            host=self.host,
            worker=worker,
            metrics=self.metrics,
        )
        self._supervisor = Supervisor([worker, self.sync], observer=self.metrics)
        self._lock = contextlib.ExitStack()
        self._services: asyncio.Task[None] | None = None

    @property
    def connected(self) -> bool:
        return self.sync.session.connected

    @property
    def deaf(self) -> bool:
        """Connected to the broker and past the connect hook, yet the session says it is
        not: a device that would never report (the agent once had such a race; the bench
        counts these so that it can never come back unnoticed)."""
        client = self.sync._client
        return client is not None and client.connected and not self.sync.session.connected

    @property
    def active_model(self) -> str | None:
        model = self.host.active
        return None if model is None else f"{model.model_id}@{model.version}"

    async def start(self) -> None:
        """The daemon's start-up, less its listeners: services first, then the model (none
        is installed yet, so the device starts without one and waits for the fleet)."""
        self._services = asyncio.get_running_loop().create_task(
            self._supervisor.run(), name=f"services-{self.device_id}"
        )
        self._lock.enter_context(self.registry.locked())
        await self.models.exclusive(self.registry.clear_interrupted_imports)
        await self.models.start()

    async def stop(self) -> None:
        """The daemon's shutdown: services cancelled, models closed, database closed."""
        if self._services is not None:
            self._services.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._services, STOP_TIMEOUT_S)
        with contextlib.suppress(Exception):
            await self.models.close(registry_wait_s=5.0)
        self._lock.close()
        await asyncio.to_thread(self.db.close)

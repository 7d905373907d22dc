"""The composition root: build every part of the agent from its config, run, shut down cleanly.

Nothing else in the agent constructs long-lived collaborators; each part receives what it needs
from here. Lifecycle:

1. make the state directory private (umask 027, see :mod:`edgelm_agent.state_dir`), raise the
   open-file limit, open the database;
2. bind the Unix socket and the loopback HTTP listener (``/healthz`` answers from now on) and
   start the long-running services (the job worker) under one supervisor;
3. take the registry; with ``--model``, sign the file into the device's repository; verify,
   load and health-check the active model (see :mod:`edgelm_agent.model_manager`); ``/readyz``
   turns 200;
4. on SIGTERM or SIGINT: ``/readyz`` turns 503, the listeners close, requests in flight get
   ``shutdown_grace_s`` to finish; those still running or waiting then get a 503 (a stream an
   error event); the services stop; registry work still running is asked to stop and waited
   for a bounded time; the process exits 0, whatever a service did. A signal during step 3
   cancels the import or activation in progress (hashing stops within a chunk) and goes
   straight to this step.

Under systemd (``Type=notify``, see :mod:`edgelm_protocol.systemd_notify`) the same steps are
told to the manager: ``STATUS=`` from the start, ``READY=1`` at step 3's end (a model serves,
or the agent is up without one), ``STOPPING=1`` at step 4, and ``WATCHDOG=1`` from the event
loop throughout. Without ``NOTIFY_SOCKET`` none of this happens.

aiohttp's own ``shutdown_timeout`` is not the grace period: it waits up to twice its value and
treats 0 as "forever", so the daemon tracks its requests and applies the grace itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from edgelm_agent.api.access import HttpAccessPolicy
from edgelm_agent.api.app import create_app
from edgelm_agent.api.connections import Listener, defer_unknown_expectations
from edgelm_agent.api.context import ApiContext
from edgelm_agent.api.errors import error_fields
from edgelm_agent.api.jobs_routes import JobsContext
from edgelm_agent.config import AgentConfig, HttpListen
from edgelm_agent.embedding_loader import EmbeddingLoader
from edgelm_agent.errors import ConfigError, ModelLoadError
from edgelm_agent.jobs.database import Database
from edgelm_agent.jobs.outbox import Outbox, OutboxLimits
from edgelm_agent.jobs.store import QueueLimits
from edgelm_agent.jobs.worker import JobWorker
from edgelm_agent.listeners import (
    bind_tcp_socket,
    bind_unix_socket,
    connection_caps,
    lock_socket_path,
    raise_open_file_limit,
    remove_socket_file,
)
from edgelm_agent.metrics import AgentMetrics
from edgelm_agent.model_manager import ModelManager
from edgelm_agent.registry.errors import ActivationFailed, RegistryError
from edgelm_agent.registry.factory import registry_for
from edgelm_agent.services import Service, Supervisor
from edgelm_agent.serving import ModelHost
from edgelm_agent.state_dir import prepare_state_dir
from edgelm_agent.sync.service import SyncService
from edgelm_protocol.systemd_notify import ServiceNotifier

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class ReadyInfo:
    socket_path: Path
    http: HttpListen | None
    model_id: str | None


class Daemon:
    def __init__(
        self, config: AgentConfig, *, on_ready: Callable[[ReadyInfo], None] | None = None
    ) -> None:
        self.config = config
        prepare_state_dir(config.state_dir)  # before any part creates a file under it
        self.metrics = AgentMetrics()
        self.host = ModelHost()
        self.registry = registry_for(config)
        self.models = ModelManager.from_config(config, self.registry, self.host, self.metrics)
        self.embeddings = EmbeddingLoader(config, self.models, self.host)
        self._registry_lock = contextlib.ExitStack()
        self._on_ready = on_ready
        self._stop = asyncio.Event()
        self.notifier = ServiceNotifier.from_environment()
        self._sync: SyncService | None = None  # for the status line

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        notifier = self.notifier
        # Fed from this loop from the start: a model that takes minutes to verify and load
        # keeps the watchdog happy (that work runs in a thread), a hung loop does not.
        status_task = asyncio.get_running_loop().create_task(
            notifier.run(self.service_status), name="systemd-notify"
        )
        try:
            await self._run(notifier)
        finally:
            notifier.stopping()  # a failed start-up too: systemd learns it from the exit code
            await _stop_task(status_task)
            notifier.close()

    def service_status(self) -> str:
        """The ``STATUS=`` line ``systemctl status`` shows."""
        sync = self._sync
        connected = None if sync is None else bool(sync.status()["broker"]["connected"])
        fleet = None if self.config.enrollment is None else self.config.enrollment.fleet
        active = self.host.active
        return describe_status(
            starting=self.host.starting,
            draining=self.host.draining,
            model_id=active.model_id if active else None,
            importing=self.config.model_path,
            fleet=fleet,
            fleet_connected=connected,
        )

    async def _run(self, notifier: ServiceNotifier) -> None:
        config = self.config
        policy = HttpAccessPolicy.from_config(config)
        self.host.starting = True  # /readyz: "loading" until the model is up, or known absent
        soft_fds = raise_open_file_limit()
        try:
            db = Database(config.state_dir / "agent.db")
        except sqlite3.Error as exc:
            raise ConfigError(f"cannot open the database in {config.state_dir}: {exc}") from exc
        worker = JobWorker(
            db,
            self.host,
            retention_s=config.jobs_retention_s,
            retention_count=config.jobs_retention_count,
            describe_error=error_fields,
            models=self.models.cache,
        )
        outbox = Outbox(
            db, OutboxLimits(config.outbox_telemetry_max, config.outbox_durable_max_bytes)
        )
        long_running: list[Service] = [worker]
        sync = None
        if config.enrollment is not None:  # a fleet device; standalone devices do not sync
            sync = SyncService(
                config,
                config.enrollment,
                db=db,
                outbox=outbox,
                registry=self.registry,
                models=self.models,
                host=self.host,
                worker=worker,
                metrics=self.metrics,
            )
            long_running.append(sync)
            self._sync = sync
        services = Supervisor(long_running, observer=self.metrics)
        ctx = ApiContext(
            self.host,
            self.metrics,
            config.max_body_bytes,
            policy,
            self.models,
            services=services,
            body_timeout_s=config.http_body_timeout_s,
            outbox=outbox,
            sync=sync,
        )
        jobs = JobsContext(
            db,
            worker,
            outbox.limits,
            self.models,
            QueueLimits(config.max_queued_jobs, config.max_queued_job_bytes),
        )
        runner = web.AppRunner(
            create_app(ctx, jobs),
            handler_cancellation=True,  # a client that disconnects cancels its handler
            shutdown_timeout=1.0,  # only closes connections: _drain() has already waited
        )
        await runner.setup()
        assert runner.server is not None
        defer_unknown_expectations(runner.server)
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(_loop_exception_handler)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        lock_fd = lock_socket_path(config.socket_path)
        socket_inode: int | None = None
        services_task: asyncio.Task[None] | None = None
        listeners: list[Listener] = []
        try:
            assert runner.server is not None
            http = config.http
            unix_cap, tcp_cap = connection_caps(
                config.max_http_connections, soft_fds, http=http is not None
            )
            unix_sock = bind_unix_socket(config.socket_path, config.socket_group)
            socket_inode = os.stat(config.socket_path).st_ino
            listeners.append(self._listener(unix_sock, runner.server, "unix", unix_cap))
            if http is not None:
                tcp_sock = bind_tcp_socket(http)
                http = HttpListen(http.host, tcp_sock.getsockname()[1])  # resolves port 0
                listeners.append(self._listener(tcp_sock, runner.server, "http", tcp_cap))
            log.info(
                "open_files",
                limit=soft_fds,
                unix_max_connections=unix_cap,
                http_max_connections=tcp_cap,
            )
            for listener in listeners:
                await listener.start()
            log.info(
                "agent_listening", socket=str(config.socket_path), http=str(http) if http else None
            )
            services_task = loop.create_task(services.run(), name="services")
            try:
                await self._start_unless_stopped()
            finally:
                self.host.starting = False
            active = self.host.active
            if not self._stop.is_set():
                log.info(
                    "agent_ready",
                    model=active.model_id if active else None,
                    socket=str(config.socket_path.absolute()),
                    http=f"http://{http}" if http else None,
                )
                if self._on_ready is not None:
                    self._on_ready(
                        ReadyInfo(config.socket_path, http, active.model_id if active else None)
                    )
                notifier.ready(self.service_status())  # /readyz answers 200, or no_model
            await self._stop.wait()
            notifier.stopping("stopping: finishing the requests in flight")
            await self._drain(listeners, ctx)
        finally:
            self.host.draining = True
            for listener in listeners:
                listener.stop_accepting()
            if services_task is not None:
                await _stop_task(services_task)
            await runner.cleanup()
            await self.models.close()
            await self.embeddings.close()
            self._registry_lock.close()
            if socket_inode is not None:
                remove_socket_file(config.socket_path, socket_inode)
            os.close(lock_fd)
            db.close()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            log.info("agent_stopped")

    def _listener(self, sock: socket.socket, server: web.Server, name: str, cap: int) -> Listener:
        return Listener(
            sock,
            server,
            name=name,
            idle_timeout_s=self.config.http_idle_timeout_s,
            max_connections=cap,
            retry_after_s=self.config.retry_after_s,
        )

    async def _start_unless_stopped(self) -> None:
        """Bring the model up, unless SIGTERM comes first. Then the import, verification or
        activation in progress is cancelled (hashing and copying stop within a chunk) and
        the agent goes on to its shutdown, without waiting for gigabytes it no longer
        needs."""
        start = asyncio.ensure_future(self._start_all())
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({start, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if start.done():
            start.result()  # the start-up's own error (a model that cannot load) goes up
            return
        start.cancel()
        # Bounded: work stuck in its thread for good is left behind (see ModelManager.close).
        await asyncio.wait({start}, timeout=START_STOP_WAIT_S)
        if start.done() and not start.cancelled():
            start.exception()  # stopping, the start-up's own outcome no longer matters

    async def _start_all(self) -> None:
        """The chat model, then the embedding model beside it (if one is configured)."""
        await self._start_models()
        await self.embeddings.start()

    async def _start_models(self) -> None:
        """Take the registry, import --model if given, and serve the active model."""
        self._registry_lock.enter_context(self.registry.locked())
        await self.models.exclusive(self.registry.clear_interrupted_imports)
        path = self.config.model_path
        if path is None:
            await self.models.start()
            return
        log.info("model_importing", path=str(path))
        context_length = self.config.context_length
        try:
            target = await self.models.exclusive_work(
                lambda cancel: self.registry.import_model(
                    path, context_length=context_length, cancel=cancel
                ),
                what="import",
            )
        except RegistryError as exc:
            raise ModelLoadError(f"cannot import {path}: {exc}") from exc
        if self.registry.state().active != target.ref or self.host.active is None:
            try:
                await self.models.activate(target.ref)
            except ActivationFailed as exc:
                raise ModelLoadError(str(exc)) from exc

    async def _drain(self, listeners: list[Listener], ctx: ApiContext) -> None:
        """Stop taking requests, give the running ones the grace period, then answer what is
        left with 503 (a stopped stream gets an error event) and cancel what still hangs."""
        grace_s = self.config.shutdown_grace_s
        self.host.draining = True  # /readyz says so on connections still open
        log.info("agent_stopping", grace_s=grace_s, in_flight=len(ctx.inflight))
        for listener in listeners:
            listener.stop_accepting()  # open connections stay
        pending = set(ctx.inflight)
        if pending and grace_s > 0:
            _, pending = await asyncio.wait(pending, timeout=grace_s)
        if not pending:
            return
        refused = sum(model.scheduler.stop_admitting() for model in self.host.models())
        _, pending = await asyncio.wait(pending, timeout=ANSWER_AFTER_GRACE_S)
        log.info("requests_stopped", refused=refused, cancelled=len(pending))
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5.0)


#: After the grace, how long stopped requests get to send their 503 before they are cancelled.
ANSWER_AFTER_GRACE_S = 2.0
#: SIGTERM during start-up: how long the import or activation in progress gets to stop.
START_STOP_WAIT_S = 10.0


def describe_status(
    *,
    starting: bool,
    draining: bool,
    model_id: str | None,
    importing: Path | None,
    fleet: str | None,
    fleet_connected: bool | None,
) -> str:
    """What the agent is doing, in one line for ``systemctl status``: loading, serving (or up
    without a model), and for a fleet device whether it syncs or is offline."""
    if draining:
        return "stopping: finishing the requests in flight"
    if starting:
        if importing is not None:
            return f"loading: importing {importing.name} into the registry"
        return "loading the active model"
    doing = f"serving {model_id}" if model_id else "up, no model to serve"
    if fleet is None:
        return doing
    if fleet_connected:
        return f"{doing}; syncing with fleet {fleet}"
    return f"{doing}; offline from fleet {fleet}, reconnecting"


def _loop_exception_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """One log line, without a traceback, for what the event loop caught outside any request.
    (The listeners accept connections themselves and log their own failures, at a limited
    rate: see api/connections.py.)"""
    message = str(context.get("message", ""))
    exc = context.get("exception")
    log.error("event_loop_error", message=message, error=repr(exc) if exc else None)


async def _stop_task(task: asyncio.Task[None]) -> None:
    """Cancel a task and wait for it; whatever it raised is logged, never re-raised, so a
    failed service cannot turn a clean shutdown into a crash."""
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    except Exception as exc:
        log.error("service_stop_failed", task=task.get_name(), error=repr(exc))

"""The composition root: build every part of the agent from its config, run, shut down cleanly.

Nothing else in the agent constructs long-lived collaborators; each part receives what it needs
from here. Lifecycle:

1. bind the Unix socket and the loopback HTTP listener (``/healthz`` answers from now on);
2. take the registry; with ``--model``, sign the file into the device's repository; verify,
   load and health-check the active model (see :mod:`edgelm_agent.model_manager`); ``/readyz``
   turns 200;
3. on SIGTERM or SIGINT: ``/readyz`` turns 503, the listeners close, requests in flight get
   ``shutdown_grace_s`` to finish and are then cancelled; the process exits 0.

aiohttp's own ``shutdown_timeout`` is not the grace period: it waits up to twice its value and
treats 0 as "forever", so the daemon tracks its requests and applies the grace itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog
from aiohttp import web

from edgelm_agent.api.access import HttpAccessPolicy, check_bind_allowed
from edgelm_agent.api.app import create_app
from edgelm_agent.api.context import ApiContext
from edgelm_agent.api.jobs_routes import JobsContext
from edgelm_agent.config import AgentConfig, HttpListen
from edgelm_agent.errors import ConfigError, ModelLoadError
from edgelm_agent.jobs.database import Database
from edgelm_agent.jobs.outbox import OutboxLimits
from edgelm_agent.jobs.worker import JobWorker
from edgelm_agent.listeners import (
    bind_tcp_socket,
    bind_unix_socket,
    lock_socket_path,
    remove_socket_file,
)
from edgelm_agent.metrics import AgentMetrics
from edgelm_agent.model_manager import ModelManager, crash_point_from
from edgelm_agent.registry.errors import ActivationFailed, RegistryError
from edgelm_agent.registry.registry import Registry, RegistryConfig
from edgelm_agent.serving import ModelHost

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
        self.metrics = AgentMetrics()
        self.host = ModelHost()
        self.registry = Registry(
            RegistryConfig(
                root=config.state_dir / "registry",
                mirrors=config.repository_mirrors,
                trust_root=config.repository_root,
                free_margin_bytes=config.disk_margin_bytes,
            ),
            crash_point=crash_point_from(config.crash_point),
        )
        self.models = ModelManager(
            self.registry,
            self.host,
            self.metrics,
            threads=config.effective_threads(),
            context_length=config.context_length,
            max_queue=config.max_queue,
            retry_after_s=config.retry_after_s,
            background_every=config.jobs_background_every,
            crash_point=crash_point_from(config.crash_point),
        )
        self._registry_lock = contextlib.ExitStack()
        self._on_ready = on_ready
        self._stop = asyncio.Event()

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        config = self.config
        policy = None
        if config.http is not None:
            check_bind_allowed(config.http, config.api_token)
            policy = HttpAccessPolicy.for_listener(
                config.http, config.api_token, config.allowed_origins
            )
        try:
            config.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"cannot create state directory {config.state_dir}: {exc.strerror}"
            ) from exc
        ctx = ApiContext(self.host, self.metrics, config.max_body_bytes, policy, self.models)
        try:
            db = Database(config.state_dir / "agent.db")
        except sqlite3.Error as exc:
            raise ConfigError(f"cannot open the database in {config.state_dir}: {exc}") from exc
        worker = JobWorker(
            db,
            self.host,
            retention_s=config.jobs_retention_s,
            retention_count=config.jobs_retention_count,
        )
        jobs = JobsContext(
            db, worker, OutboxLimits(config.outbox_telemetry_max, config.outbox_durable_max_bytes)
        )
        runner = web.AppRunner(
            create_app(ctx, jobs),
            handler_cancellation=True,  # a client that disconnects cancels its handler
            shutdown_timeout=1.0,  # only closes connections: _drain() has already waited
            access_log=None,  # our middleware logs every request with its model and tokens
        )
        await runner.setup()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        lock_fd = lock_socket_path(config.socket_path)
        socket_inode: int | None = None
        worker_task: asyncio.Task[None] | None = None
        try:
            unix_sock = bind_unix_socket(config.socket_path)
            socket_inode = os.stat(config.socket_path).st_ino
            await web.SockSite(runner, unix_sock).start()
            http = config.http
            if http is not None:
                tcp_sock = bind_tcp_socket(http)
                http = HttpListen(http.host, tcp_sock.getsockname()[1])  # resolves port 0
                await web.SockSite(runner, tcp_sock).start()
            log.info(
                "agent_listening", socket=str(config.socket_path), http=str(http) if http else None
            )
            await self._start_models()
            worker_task = loop.create_task(worker.run())
            active = self.host.active
            if not self._stop.is_set():
                log.info("agent_ready", model=active.model_id if active else None)
                if self._on_ready is not None:
                    self._on_ready(
                        ReadyInfo(config.socket_path, http, active.model_id if active else None)
                    )
            await self._stop.wait()
            await self._drain(runner, ctx)
        finally:
            self.host.draining = True
            if worker_task is not None:
                worker_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await worker_task
            await runner.cleanup()
            await self.models.close()
            self._registry_lock.close()
            if socket_inode is not None:
                remove_socket_file(config.socket_path, socket_inode)
            os.close(lock_fd)
            db.close()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            log.info("agent_stopped")

    async def _start_models(self) -> None:
        """Take the registry, import --model if given, and serve the active model."""
        self._registry_lock.enter_context(self.registry.locked())
        await asyncio.to_thread(self.registry.clear_interrupted_imports)
        path = self.config.model_path
        if path is None:
            await self.models.start()
            return
        log.info("model_importing", path=str(path))
        try:
            target = await asyncio.to_thread(
                self.registry.import_model, path, context_length=self.config.context_length
            )
        except RegistryError as exc:
            raise ModelLoadError(f"cannot import {path}: {exc}") from exc
        if self.registry.state().active != target.ref or self.host.active is None:
            try:
                await self.models.activate(target.ref)
            except ActivationFailed as exc:
                raise ModelLoadError(str(exc)) from exc

    async def _drain(self, runner: web.AppRunner, ctx: ApiContext) -> None:
        """Stop taking requests, give the running ones the grace period, cancel the rest."""
        grace_s = self.config.shutdown_grace_s
        self.host.draining = True  # /readyz says so on connections still open
        log.info("agent_stopping", grace_s=grace_s, in_flight=len(ctx.inflight))
        for site in list(runner.sites):
            await site.stop()  # closes the listening sockets; open connections stay
        pending = set(ctx.inflight)
        if pending and grace_s > 0:
            _, pending = await asyncio.wait(pending, timeout=grace_s)
        if pending:
            log.info("requests_cancelled", count=len(pending))
            for model in self.host.models():
                model.scheduler.cancel_running()
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=5.0)

"""Registry work runs in a thread of its own, under the activation lock, until it has ended."""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from edgelm_agent.metrics import AgentMetrics
from edgelm_agent.model_manager import ModelManager
from edgelm_agent.registry.registry import Registry, RegistryConfig
from edgelm_agent.serving import ModelHost
from edgelm_agent.worker_thread import WorkerThread


@pytest.fixture
async def manager(tmp_path: Path) -> AsyncIterator[ModelManager]:
    registry = Registry(RegistryConfig(root=tmp_path / "registry"))
    manager = ModelManager(
        registry, ModelHost(), AgentMetrics(), threads=1, context_length=512, max_queue=1,
        retry_after_s=1,
    )  # fmt: skip
    yield manager
    await manager.close(registry_wait_s=5)


async def started(event: threading.Event) -> None:
    """Wait (on the loop) until a thread has set ``event``."""
    while not event.is_set():
        await asyncio.sleep(0.01)


class TestExclusive:
    async def test_registry_work_runs_on_its_own_thread(self, manager: ModelManager) -> None:
        """Registry work never takes a thread of asyncio's default pool, which tokenization
        and the job queue share."""
        name = await manager.exclusive(lambda: threading.current_thread().name)
        assert name == "edgelm-registry"

    async def test_a_caller_that_goes_away_keeps_the_lock_until_the_work_ends(
        self, manager: ModelManager
    ) -> None:
        """Cancelling the caller asks the work to stop and waits for it: the next registry
        change starts only once the first has really ended, never beside it."""
        order: list[str] = []
        running, release = threading.Event(), threading.Event()

        def first(cancel: threading.Event) -> None:
            running.set()
            release.wait(30)
            order.append(f"first ends, asked to stop: {cancel.is_set()}")

        caller = asyncio.ensure_future(manager.exclusive_work(first, what="first"))
        await started(running)
        caller.cancel()
        second = asyncio.ensure_future(manager.exclusive(lambda: order.append("second starts")))
        for _ in range(20):  # room for the second to start, were the lock let go
            await asyncio.sleep(0.01)
        release.set()
        await second
        with pytest.raises(asyncio.CancelledError):
            await caller
        assert order == ["first ends, asked to stop: True", "second starts"]

    async def test_the_cancellation_is_logged(self, manager: ModelManager) -> None:
        """A caller going away leaves one registry_work_cancelled line naming the work."""
        running = threading.Event()

        def work(cancel: threading.Event) -> None:
            running.set()
            cancel.wait(30)

        with capture_logs() as logs:
            caller = asyncio.ensure_future(manager.exclusive_work(work, what="import"))
            await started(running)
            caller.cancel()
            with pytest.raises(asyncio.CancelledError):
                await caller
        assert [e["work"] for e in logs if e["event"] == "registry_work_cancelled"] == ["import"]


class TestClose:
    async def test_close_does_not_wait_for_ever_on_stuck_work(self, tmp_path: Path) -> None:
        """Work that ignores its cancel event holds close() for the bounded wait only, and
        the log says so."""
        registry = Registry(RegistryConfig(root=tmp_path / "registry"))
        manager = ModelManager(
            registry, ModelHost(), AgentMetrics(), threads=1, context_length=512, max_queue=1,
            retry_after_s=1,
        )  # fmt: skip
        running, stuck = threading.Event(), threading.Event()

        def ignores_cancel(cancel: threading.Event) -> None:
            running.set()
            stuck.wait(60)

        caller = asyncio.ensure_future(manager.exclusive_work(ignores_cancel, what="import"))
        await started(running)
        try:
            with capture_logs() as logs:
                await manager.close(registry_wait_s=0.2)
            assert "registry_thread_stuck" in [e["event"] for e in logs]
        finally:
            stuck.set()
            caller.cancel()
            await asyncio.gather(caller, return_exceptions=True)


class TestWorkerThread:
    def test_calls_run_in_order_and_errors_reach_the_caller(self) -> None:
        """Work runs one call after another; what a call raises is raised by its future."""
        thread = WorkerThread("t")
        done: list[int] = []
        futures = [thread.submit(functools.partial(done.append, n)) for n in range(5)]
        failing = thread.submit(lambda: 1 // 0)
        for f in futures:
            f.result(10)
        with pytest.raises(ZeroDivisionError):
            failing.result(10)
        assert done == [0, 1, 2, 3, 4]
        assert thread.shutdown(10)

    def test_its_thread_never_holds_the_process_open(self) -> None:
        """The thread is a daemon: work stuck for good cannot keep the interpreter from
        exiting."""
        thread = WorkerThread("t")
        worker = thread.submit(threading.current_thread).result(10)
        assert worker.daemon
        assert thread.shutdown(10)

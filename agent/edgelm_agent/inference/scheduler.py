"""One model, one generation at a time, a bounded FIFO queue in front.

The scheduler is the bridge between asyncio and the backend's worker thread:

* **Admission** is first come, first served. At most ``max_queue`` requests wait; one more is
  refused at once with :class:`~edgelm_agent.errors.QueueFull` (the API answers 429 with
  ``Retry-After``), so a busy device never hangs a client.
* **Streaming**: the worker thread hands each event to the loop with ``call_soon_threadsafe``;
  the consumer sees every token as soon as the runtime makes it.
* **Cancellation**: a consumer that goes away (client disconnect, handler cancelled) sets the
  run's cancel flag, and the slot is released only when the worker thread has actually returned,
  so the next request never races a generation that is still running on the same model.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar, cast

import structlog

from edgelm_agent.errors import BackendError, NotReady, QueueFull, RequestError
from edgelm_agent.inference.backend import Backend, run_generation
from edgelm_agent.inference.event_pipe import EventPipe
from edgelm_agent.inference.types import Finished, GenerationEvent, GenerationRequest

log = structlog.get_logger(__name__)
T = TypeVar("T")


class FifoAdmission:
    """An asyncio lock with two bounded first-in first-out wait queues.

    Interactive requests (a person at a kiosk) go first. Background jobs wait in their own lane,
    and when both lanes wait, every ``background_every``-th grant goes to a job, so jobs keep
    moving under steady interactive load but never make the kiosk feel slow.
    """

    def __init__(self, max_waiting: int, retry_after_s: int, *, background_every: int = 4) -> None:
        self._max_waiting = max_waiting
        self._retry_after_s = retry_after_s
        self._background_every = max(1, background_every)
        self._busy = False
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._background: deque[asyncio.Future[None]] = deque()
        self._interactive_streak = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def waiting(self) -> int:
        """Interactive requests waiting: what the 429 limit and the queue-depth metric count."""
        return len(self._waiters)

    @property
    def background_waiting(self) -> int:
        return len(self._background)

    @property
    def busy(self) -> bool:
        return self._busy

    async def acquire(self, *, background: bool = False) -> None:
        if not self._busy and not self._waiters and not self._background:
            self._busy = True
            self._idle.clear()
            return
        lane = self._background if background else self._waiters
        if len(lane) >= self._max_waiting:
            raise QueueFull(
                f"the model is busy and {len(lane)} requests are already waiting",
                retry_after_s=self._retry_after_s,
            )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        lane.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.release()  # we were handed the slot as we were cancelled: pass it on
            elif waiter in lane:  # release() may have popped it already
                lane.remove(waiter)
            raise

    def _next_lane(self) -> deque[asyncio.Future[None]]:
        if self._waiters and self._background:
            if self._interactive_streak + 1 >= self._background_every:
                self._interactive_streak = 0
                return self._background
            self._interactive_streak += 1
            return self._waiters
        if self._background:
            self._interactive_streak = 0
            return self._background
        return self._waiters

    def refuse_waiting(self, exc: BaseException) -> int:
        """Fail every request still waiting with ``exc`` (shutdown); returns how many."""
        refused = 0
        for lane in (self._waiters, self._background):
            while lane:
                waiter = lane.popleft()
                if not waiter.done():
                    waiter.set_exception(exc)
                    refused += 1
        return refused

    def release(self) -> None:
        while self._waiters or self._background:
            waiter = self._next_lane().popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot moves to the waiter; _busy stays True
                return
        self._busy = False
        self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()


@dataclass
class SchedulerHooks:
    """Observers for metrics; the scheduler does not know about Prometheus."""

    on_queue_depth: Callable[[int], None] = lambda depth: None
    on_queue_wait: Callable[[float], None] = lambda seconds: None
    #: Every generation that ran, including those cut short by a client that left.
    on_finished: Callable[[Finished], None] = lambda finished: None
    #: A generation the runtime failed.
    on_failed: Callable[[BaseException], None] = lambda exc: None

    def then(self, other: SchedulerHooks) -> SchedulerHooks:
        """Both sets of observers, this one first."""

        def both(first: Callable[[T], None], second: Callable[[T], None]) -> Callable[[T], None]:
            def call(value: T) -> None:
                first(value)
                second(value)

            return call

        return SchedulerHooks(
            on_queue_depth=both(self.on_queue_depth, other.on_queue_depth),
            on_queue_wait=both(self.on_queue_wait, other.on_queue_wait),
            on_finished=both(self.on_finished, other.on_finished),
            on_failed=both(self.on_failed, other.on_failed),
        )


class _WorkerFailed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class Scheduler:
    """Runs generations on one backend, one at a time, in arrival order."""

    def __init__(
        self,
        backend: Backend,
        *,
        max_queue: int,
        retry_after_s: int,
        hooks: SchedulerHooks | None = None,
        background_every: int = 4,
    ) -> None:
        self.backend = backend
        self._admission = FifoAdmission(max_queue, retry_after_s, background_every=background_every)
        self._retry_after_s = retry_after_s
        self._hooks = hooks or SchedulerHooks()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgelm-generate")
        self._active_cancel: threading.Event | None = None
        self._closed = False

    @property
    def queue_depth(self) -> int:
        """Requests waiting for the model, not counting the one running."""
        return self._admission.waiting

    @property
    def busy(self) -> bool:
        return self._admission.busy

    async def generate(
        self, request: GenerationRequest, *, background: bool = False
    ) -> AsyncGenerator[list[GenerationEvent], None]:
        """Stream the events of one generation in batches; the last event is :class:`Finished`.

        A batch holds every event the runtime made since the consumer last asked, so a consumer
        can write them to its client in one go. Use it under ``contextlib.aclosing`` so that
        leaving early cancels the generation.
        """
        if self._closed:
            raise NotReady("the agent is shutting down", retry_after_s=self._retry_after_s)
        enqueued = time.perf_counter()
        self._hooks.on_queue_depth(self._admission.waiting + 1)
        try:
            await self._admission.acquire(background=background)
        finally:
            self._hooks.on_queue_depth(self._admission.waiting)
        self._hooks.on_queue_wait(time.perf_counter() - enqueued)

        loop = asyncio.get_running_loop()
        pipe: EventPipe[GenerationEvent | _WorkerFailed] = EventPipe(loop)
        cancel = threading.Event()

        def work() -> Finished | None:
            try:
                return run_generation(self.backend, request, cancel, pipe.put)
            except BaseException as exc:  # delivered to the consumer, not lost in the thread
                pipe.put(_WorkerFailed(exc))
                return None

        try:
            done = loop.run_in_executor(self._executor, work)
        except BaseException:
            self._admission.release()
            raise
        self._active_cancel = cancel
        done.add_done_callback(lambda fut: self._worker_done(fut, cancel, request))
        try:
            while True:
                batch = await pipe.take()
                failed = next((e for e in batch if isinstance(e, _WorkerFailed)), None)
                if failed is not None:
                    made_before = cast(list[GenerationEvent], batch[: batch.index(failed)])
                    if made_before:  # text the client should still get before the error
                        yield made_before
                    if isinstance(failed.exc, RequestError):
                        # The runtime refused this request (a constraint it cannot compile):
                        # the client's fault, not a failing model.
                        raise failed.exc
                    self._hooks.on_failed(failed.exc)
                    log.error(
                        "generation_failed", request_id=request.request_id, error=repr(failed.exc)
                    )
                    raise BackendError(f"generation failed: {failed.exc}") from failed.exc
                events = cast(list[GenerationEvent], batch)
                yield events
                if isinstance(events[-1], Finished):
                    return
        finally:
            cancel.set()  # no-op after a normal finish; stops the worker when we leave early

    def _worker_done(
        self,
        fut: asyncio.Future[Finished | None],
        cancel: threading.Event,
        request: GenerationRequest,
    ) -> None:
        if self._active_cancel is cancel:
            self._active_cancel = None
        self._admission.release()
        finished = None if fut.cancelled() else fut.result()
        if finished is not None:
            self._hooks.on_finished(finished)
            if finished.reason == "cancelled":
                log.info(
                    "generation_cancelled",
                    request_id=request.request_id,
                    completion_tokens=finished.completion_tokens,
                )

    def stop_admitting(self) -> int:
        """At the end of the shutdown grace: refuse new and waiting requests with NotReady (a
        JSON 503 with Retry-After, not a dropped connection) and stop the running generation.
        Returns how many waiting requests were refused."""
        self._closed = True
        refused = self._admission.refuse_waiting(
            NotReady("the agent is shutting down", retry_after_s=self._retry_after_s)
        )
        self.cancel_running()
        return refused

    def cancel_running(self) -> None:
        """Ask the running generation, if any, to stop at its next token."""
        if self._active_cancel is not None:
            self._active_cancel.set()

    async def drain(self) -> None:
        """Wait, without cancelling anything, until no request runs or waits."""
        await self._admission.wait_idle()

    async def close(self, timeout_s: float = 10.0) -> None:
        """Refuse new work, stop the running generation and free the worker thread.

        Both runtimes notice a cancel within one token or one prompt slice, so the wait is
        short; the bound only guards against a runtime that hangs.
        """
        self._closed = True
        self.cancel_running()
        try:
            async with asyncio.timeout(timeout_s):  # not wait_for: it can swallow a cancel
                await asyncio.to_thread(self._executor.shutdown, wait=True)
        except TimeoutError:
            log.error("generation_thread_stuck", timeout_s=timeout_s)

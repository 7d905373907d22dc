"""Scheduler: one generation at a time, FIFO admission, 429 when full, cancellation."""

from __future__ import annotations

import asyncio
from contextlib import aclosing

import pytest

from edgelm_agent.errors import BackendError, NotReady, QueueFull
from edgelm_agent.inference.event_pipe import EventPipe
from edgelm_agent.inference.scheduler import FifoAdmission, Scheduler, SchedulerHooks
from edgelm_agent.inference.types import Finished, GenerationRequest, SamplingParams, TextDelta
from tests.fake_backend import FakeBackend


def request(tag: int, max_tokens: int = 10) -> GenerationRequest:
    return GenerationRequest(
        (tag,), SamplingParams(max_tokens=max_tokens, temperature=0), request_id=str(tag)
    )


async def run(scheduler: Scheduler, req: GenerationRequest) -> tuple[str, Finished]:
    text, finished = "", None
    async with aclosing(scheduler.generate(req)) as batches:
        async for batch in batches:
            for event in batch:
                if isinstance(event, TextDelta):
                    text += event.text
                else:
                    finished = event
    assert finished is not None
    return text, finished


async def until(predicate, timeout_s: float = 30.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.001)


class TestFifoAdmission:
    async def test_waiters_are_served_in_arrival_order(self):
        """Released slots go to waiters first come, first served."""
        admission = FifoAdmission(max_waiting=5, retry_after_s=1)
        await admission.acquire()
        order: list[int] = []

        async def waiter(i: int) -> None:
            await admission.acquire()
            order.append(i)
            admission.release()

        tasks = [asyncio.create_task(waiter(i)) for i in range(5)]
        await until(lambda: admission.waiting == 5)
        admission.release()
        await asyncio.gather(*tasks)
        assert order == [0, 1, 2, 3, 4]
        assert not admission.busy

    async def test_full_queue_raises_at_once(self):
        """With the slot taken and max_waiting waiters, the next acquire raises QueueFull."""
        admission = FifoAdmission(max_waiting=1, retry_after_s=7)
        await admission.acquire()
        waiting = asyncio.create_task(admission.acquire())
        await until(lambda: admission.waiting == 1)
        with pytest.raises(QueueFull) as info:
            await admission.acquire()
        assert info.value.retry_after_s == 7
        waiting.cancel()

    async def test_cancelled_waiter_leaves_the_queue(self):
        """A waiter cancelled while queued frees its place."""
        admission = FifoAdmission(max_waiting=1, retry_after_s=1)
        await admission.acquire()
        waiting = asyncio.create_task(admission.acquire())
        await until(lambda: admission.waiting == 1)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert admission.waiting == 0
        admission.release()
        assert not admission.busy

    async def test_cancel_and_release_in_the_same_step(self):
        """A waiter cancelled in the same loop step as release() raises CancelledError only."""
        admission = FifoAdmission(max_waiting=2, retry_after_s=1)
        await admission.acquire()
        waiting = asyncio.create_task(admission.acquire())
        await until(lambda: admission.waiting == 1)
        waiting.cancel()
        admission.release()  # pops the cancelled waiter before its task runs
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert admission.waiting == 0
        assert not admission.busy

    async def test_slot_handed_to_a_cancelled_waiter_moves_on(self):
        """If the slot is handed over just as the waiter is cancelled, the next waiter gets it."""
        admission = FifoAdmission(max_waiting=2, retry_after_s=1)
        await admission.acquire()
        first = asyncio.create_task(admission.acquire())
        second = asyncio.create_task(admission.acquire())
        await until(lambda: admission.waiting == 2)
        admission.release()  # hands the slot to `first`...
        first.cancel()  # ...which is cancelled before it runs
        with pytest.raises(asyncio.CancelledError):
            await first
        await asyncio.wait_for(second, 30)  # `second` must not be stranded
        assert admission.busy


class TestEventPipe:
    async def test_items_put_while_the_consumer_is_busy_arrive_as_one_batch(self):
        """Items put before take() come back together, in order."""
        pipe: EventPipe[int] = EventPipe(asyncio.get_running_loop())
        for i in range(3):
            pipe.put(i)
        assert await pipe.take() == [0, 1, 2]

    async def test_take_waits_for_a_put_from_another_thread(self):
        """A waiting consumer is woken by a put from a worker thread."""
        pipe: EventPipe[str] = EventPipe(asyncio.get_running_loop())
        waiting = asyncio.create_task(pipe.take())
        await asyncio.sleep(0)
        await asyncio.to_thread(pipe.put, "x")
        assert await asyncio.wait_for(waiting, 30) == ["x"]


class TestScheduler:
    async def test_generates_text_and_finishes(self):
        """A request streams its text and ends with Finished."""
        scheduler = Scheduler(FakeBackend(["x", "y"]), max_queue=2, retry_after_s=1)
        text, finished = await run(scheduler, request(1))
        assert (text, finished.reason) == ("xy", "stop")
        await scheduler.close()

    async def test_one_generation_at_a_time_in_fifo_order(self):
        """Concurrent requests never overlap on the backend and run in arrival order."""
        backend = FakeBackend(["a", "b"])
        scheduler = Scheduler(backend, max_queue=10, retry_after_s=1)
        results = await asyncio.gather(*(run(scheduler, request(i)) for i in range(8)))
        assert all(text == "ab" for text, _ in results)
        assert backend.max_running == 1
        assert backend.runs == [(i,) for i in range(8)]
        await scheduler.close()

    async def test_queue_full_is_refused_immediately(self):
        """With one running and max_queue waiting, another request gets QueueFull."""
        backend = FakeBackend(["a"], gated=True)
        scheduler = Scheduler(backend, max_queue=1, retry_after_s=3)
        running = asyncio.create_task(run(scheduler, request(1)))
        queued = asyncio.create_task(run(scheduler, request(2)))
        await until(lambda: scheduler.queue_depth == 1 and backend.started.is_set())
        with pytest.raises(QueueFull):
            await run(scheduler, request(3))
        backend.release(2)
        await asyncio.gather(running, queued)
        await scheduler.close()

    async def test_leaving_early_stops_the_generation_and_frees_the_model(self):
        """A consumer that stops reading cancels the run; the next request gets the model."""
        backend = FakeBackend(list("abcdefgh"), gated=True)
        scheduler = Scheduler(backend, max_queue=1, retry_after_s=1)
        finished: list[Finished] = []
        scheduler._hooks.on_finished = finished.append
        async with aclosing(scheduler.generate(request(1))) as batches:
            backend.release(1)
            first = await anext(batches)
            assert first == [TextDelta("a", 1)]
        await until(lambda: not scheduler.busy)
        assert finished[0].reason == "cancelled"
        assert backend.running == 0
        backend.gate = None  # let the next run through freely
        assert (await run(scheduler, request(2)))[0] == "abcdefgh"
        await scheduler.close()

    async def test_runtime_failure_becomes_backend_error(self):
        """An exception in the worker thread reaches the consumer as BackendError."""
        backend = FakeBackend(["a", "b"], fail_after=1)
        failures: list[BaseException] = []
        scheduler = Scheduler(
            backend, max_queue=1, retry_after_s=1, hooks=SchedulerHooks(on_failed=failures.append)
        )
        with pytest.raises(BackendError, match="runtime exploded"):
            await run(scheduler, request(1))
        assert [str(e) for e in failures] == ["runtime exploded"]
        await until(lambda: not scheduler.busy)  # freed once the worker thread returns
        backend.fail_after = None
        assert (await run(scheduler, request(2)))[0] == "ab"
        await scheduler.close()

    async def test_closed_scheduler_refuses_work(self):
        """After close(), new requests get NotReady."""
        scheduler = Scheduler(FakeBackend(), max_queue=1, retry_after_s=1)
        await scheduler.close()
        with pytest.raises(NotReady):
            await run(scheduler, request(1))

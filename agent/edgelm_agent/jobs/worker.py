"""Runs queued jobs, one at a time, through the same scheduler as interactive requests.

Jobs take the scheduler's background lane, so a person at the kiosk is served first and jobs
still get their share. A job runs only on the model it names: jobs for another model wait in
the queue (bounded by their TTL) until that model is served. With a RAM budget, every installed
chat model can be served: a job naming one takes a lease on it as a request does (see
:mod:`edgelm_agent.model_cache`), loading it first if needed, and holds it until its generation
has ended, so no unload closes the model under the job.

Failures are sorted by who is at fault: a request that can never work (bad fields, too long)
fails at once; a busy or failing runtime is retried with backoff until the job's attempts run
out and it is dead. Whatever one job holds, it can only fail that job: an exception this code
did not foresee fails the attempt like a runtime fault would. What stops the worker is the
database failing (a full disk): then :meth:`JobWorker.run` raises, the supervisor restarts it
with backoff (see :mod:`edgelm_agent.services`), and the restart puts the job that was running
back in the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager, aclosing, nullcontext
from typing import Any

import structlog

from edgelm_agent.errors import EdgelmError, InvalidRequest, NotReady, RequestError
from edgelm_agent.generation.openai_format import Usage
from edgelm_agent.generation.prepare import kind_of, prepare
from edgelm_agent.inference.types import Finished, TextDelta
from edgelm_agent.jobs import store
from edgelm_agent.jobs.database import Database
from edgelm_agent.model_cache import DEFAULT_KEEP_ALIVE, KeepAlive, ModelCache
from edgelm_agent.residency import parse_keep_alive
from edgelm_agent.serving import ModelHost, ServingModel
from edgelm_agent.valid_unicode import first_invalid_text

log = structlog.get_logger(__name__)


class GenerationInterrupted(NotReady):
    """The generation was stopped before its end (the agent is shutting down): run it again."""

    code = "interrupted"


class JobWorker:
    name = "jobs"

    def __init__(
        self,
        db: Database,
        host: ModelHost,
        *,
        retention_s: float,
        retention_count: int,
        idle_poll_s: float = 1.0,
        describe_error: Callable[[EdgelmError], dict[str, Any]] = lambda exc: {
            "code": exc.code,
            "message": str(exc),
        },
        models: ModelCache | None = None,
    ) -> None:
        self.db = db
        self.host = host
        #: Leases on the models jobs run on, which loads them on demand; ``None``: jobs run
        #: on the active model only (tests of the queue alone).
        self.models = models
        self.retention_s = retention_s
        self.retention_count = retention_count
        self.idle_poll_s = idle_poll_s
        #: Turns an error into a job's ``error`` object; the composition root passes the API's
        #: (edgelm_agent.api.errors.error_fields), so a job's error reads like an HTTP one.
        self._describe_error = describe_error
        self._wake = asyncio.Event()
        self._running: dict[str, asyncio.Task[Any]] = {}
        self._cancelled: set[str] = set()
        self._last_prune = 0.0

    def wake(self) -> None:
        """A job was submitted: look now rather than at the next poll."""
        self._wake.set()

    def cancel(self, job_id: str) -> None:
        """Stop a running job (already marked cancelled in the database)."""
        task = self._running.get(job_id)
        if task is not None:
            self._cancelled.add(job_id)
            task.cancel()

    async def run(self) -> None:
        recovered = await self.db.run(store.recover)
        if recovered:
            log.info("jobs_recovered", count=recovered)
        while True:
            names = await self._runnable()
            if not names:
                # No model to run on: wait rather than spend the jobs' attempts on NotReady,
                # but let deadlines pass as they would with one.
                await self.db.run(store.expire(time.time()))
                await self._idle(names)
                continue
            job = await self.db.run(store.claim(time.time(), names))
            if job is None:
                await self._idle(names)
                continue
            task = asyncio.get_running_loop().create_task(self._execute(job))
            self._running[job["id"]] = task
            try:
                await asyncio.shield(task)  # our own cancellation (shutdown) is handled below
            except asyncio.CancelledError:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                raise  # the job stays "running" on disk and is recovered at the next start
            finally:
                self._running.pop(job["id"], None)

    async def _runnable(self) -> Sequence[str]:
        """The model names whose jobs can run now."""
        if self.models is not None:
            return await self.models.runnable_names()
        active = self.host.active
        return () if active is None or self.host.draining else active.names

    async def _idle(self, names: Sequence[str]) -> None:
        now = time.time()
        if now - self._last_prune > 60:
            self._last_prune = now
            await self.db.run(store.prune(self.retention_s, self.retention_count))
        self._wake.clear()  # before the query: a wake() during it must not be lost
        due = await self.db.read(store.next_due(names)) if names else None
        wait_s = self.idle_poll_s if due is None else max(0.0, min(self.idle_poll_s, due - now))
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancel that
        # arrives as the wait ends, and then the worker would not stop (CPython gh-86296).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait_s):
                await self._wake.wait()

    async def _execute(self, job: dict[str, Any]) -> None:
        job_id = job["id"]
        log.info("job_started", job_id=job_id, attempt=job["attempts"])
        try:
            await self._attempt(job)
        except asyncio.CancelledError:
            # Cancelled through the API (already recorded as cancelled), at whatever await the
            # job was: while generating or while its outcome was being stored. Only this job
            # ends; a cancel for any other reason (shutdown) goes on up.
            if job_id not in self._cancelled:
                raise
            self._cancelled.discard(job_id)
            log.info("job_cancelled", job_id=job_id)

    async def _attempt(self, job: dict[str, Any]) -> None:
        job_id = job["id"]
        try:
            result, model = await self._generate(job)
        except RequestError as exc:  # the request itself is wrong: retrying cannot help
            await self.db.run(store.fail(job, self._describe_error(exc), transient=False))
            log.info("job_failed", job_id=job_id, error=exc.code)
            return
        except EdgelmError as exc:  # busy, loading, runtime failure: worth another attempt
            state = await self.db.run(store.fail(job, self._describe_error(exc), transient=True))
            log.warning("job_attempt_failed", job_id=job_id, error=exc.code, now=state)
            return
        except Exception as exc:  # a fault nobody foresaw fails this attempt, not the worker
            log.exception("job_attempt_crashed", job_id=job_id, error=repr(exc))
            error = {
                "code": "internal_error",
                "type": "server_error",
                "message": f"the job failed unexpectedly ({type(exc).__name__}); see the agent log",
            }
            state = await self.db.run(store.fail(job, error, transient=True))
            log.warning("job_attempt_failed", job_id=job_id, error="internal_error", now=state)
            return
        stored = await self.db.run(store.succeed(job, result))
        log.info(
            "job_succeeded",
            job_id=job_id,
            stored=stored,
            completion_tokens=result["usage"]["completion_tokens"],
            model=model.model_id,
            model_digest=model.digest or None,
            model_signer=",".join(model.signers) or None,
        )

    async def _generate(self, job: dict[str, Any]) -> tuple[dict[str, Any], ServingModel]:
        """The job's result, and the model that made it (for the log line's provenance)."""
        request = {**job["request"], "stream": False}
        invalid = first_invalid_text(request, "request")
        if invalid is not None:  # stored before the agent checked this at the door
            raise InvalidRequest(invalid.message, param=invalid.param)
        keep_alive: KeepAlive = DEFAULT_KEEP_ALIVE
        if "keep_alive" in request:  # as on /v1/chat/completions: the model's, not the body's
            keep_alive = parse_keep_alive(request.pop("keep_alive"))
        async with self._lease(request, keep_alive):
            prepared = await prepare(request, self.host, kind_of(request))
            model = prepared.model
            generation = prepared.request(job["id"])
            texts: list[str] = []
            finished: Finished | None = None
            async with aclosing(model.scheduler.generate(generation, background=True)) as batches:
                async for batch in batches:
                    texts.extend(e.text for e in batch if isinstance(e, TextDelta))
                    if isinstance(batch[-1], Finished):
                        finished = batch[-1]
        assert finished is not None
        if finished.reason == "cancelled":  # stopped at shutdown: not an answer to store
            raise GenerationInterrupted("the generation was stopped", retry_after_s=5)
        usage = Usage(len(prepared.tokens), finished.completion_tokens)
        return prepared.formatter.full("".join(texts), finished.reason, usage), model

    def _lease(
        self, request: dict[str, Any], keep_alive: KeepAlive
    ) -> AbstractAsyncContextManager[None]:
        """The job's model held in memory (loaded first if need be) while the job runs."""
        name = request.get("model")
        if self.models is None or not isinstance(name, str) or not name:
            return nullcontext()  # a bad model field: prepare() says what is wrong
        return self.models.lease(name, keep_alive)

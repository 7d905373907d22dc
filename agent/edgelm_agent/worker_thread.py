"""One daemon thread that runs blocking calls one at a time, and never holds the process open.

Registry work (hashing and copying models of gigabytes, re-hashing one before it loads) runs
here rather than on asyncio's default executor, which tokenization, the job queue and model
loading share: however long an import runs, it takes nothing from them. And unlike a
``ThreadPoolExecutor``, whose threads the interpreter joins at exit, a call stuck for good (a
dead disk) cannot keep the agent from exiting once its shutdown has waited long enough.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")

_Item = tuple[Callable[[], Any], "Future[Any]"]


class WorkerThread:
    def __init__(self, name: str) -> None:
        self.name = name
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        """Run ``fn`` after everything submitted before it; its outcome lands in the future."""
        future: Future[T] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self.name} is shut down")
            if self._thread is None:  # started on first use: most agents never import
                self._thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
                self._thread.start()
            self._queue.put((fn, future))
        return future

    def _serve(self) -> None:
        while (item := self._queue.get()) is not None:
            fn, future = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn()
            except BaseException as exc:  # delivered to whoever waits on the future
                future.set_exception(exc)
            else:
                future.set_result(result)

    def shutdown(self, timeout_s: float) -> bool:
        """Let the work already submitted finish, for up to ``timeout_s``; whether the thread
        has ended. Work still running after that is left to the process's exit."""
        with self._lock:
            self._closed = True
            thread = self._thread
        if thread is None:
            return True
        self._queue.put(None)
        thread.join(timeout_s)
        return not thread.is_alive()

"""Telemetry batches: what the device's model did over a window, and how the device is doing.

Every ``telemetry_interval_s`` the sync service turns the window into one ``telemetry`` body
(tokens/s and TTFT percentiles, requests, errors, queue depth, CPU, memory, disk, temperature)
and puts it in the outbox, where the newest ``outbox_telemetry_max`` are kept while offline.
The numbers come from the scheduler's hooks (every generation that ran) and from ``/proc`` and
``/sys``; a figure the system does not offer is ``null``, never a guess.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgelm_agent.inference.types import Finished

MAX_SAMPLES = 10_000  # per window: a flood of tiny requests must not grow memory without bound
THERMAL_ZONES = Path("/sys/class/thermal")


def percentile(sorted_values: list[float], share: float) -> float | None:
    """The nearest-rank percentile of values already sorted; ``None`` for no values."""
    if not sorted_values:
        return None
    rank = max(0, min(len(sorted_values) - 1, round(share * len(sorted_values) + 0.5) - 1))
    return sorted_values[rank]


@dataclass
class TelemetryWindow:
    """Generations since the last batch. Fed on the event loop by the scheduler's hooks."""

    requests: int = 0
    errors: int = 0
    tokens_per_s: list[float] = field(default_factory=list)
    ttft_ms: list[float] = field(default_factory=list)
    max_queue_depth: int = 0
    started: float = field(default_factory=time.monotonic)

    def finished(self, finished: Finished) -> None:
        self.requests += 1
        if len(self.ttft_ms) < MAX_SAMPLES:
            self.ttft_ms.append(finished.prefill_s * 1000)
            if finished.tokens_per_s is not None:
                self.tokens_per_s.append(finished.tokens_per_s)

    def failed(self) -> None:
        self.errors += 1

    def queue_depth(self, depth: int) -> None:
        self.max_queue_depth = max(self.max_queue_depth, depth)

    def take(self, now: float) -> TelemetryWindow:
        """This window's figures, and a fresh window from ``now`` on."""
        taken = TelemetryWindow(
            self.requests,
            self.errors,
            self.tokens_per_s,
            self.ttft_ms,
            self.max_queue_depth,
            self.started,
        )
        self.requests = self.errors = self.max_queue_depth = 0
        self.tokens_per_s, self.ttft_ms = [], []
        self.started = now
        return taken


class SystemStats:
    """CPU, memory, disk and temperature, read from the system (Linux)."""

    def __init__(
        self,
        state_dir: Path,
        *,
        clock: Callable[[], float] = time.monotonic,
        cpu_time: Callable[[], float] = time.process_time,
    ) -> None:
        self._state_dir = state_dir
        self._clock = clock
        self._cpu_time = cpu_time
        self._last = (clock(), cpu_time())

    def cpu_percent(self) -> float | None:
        """The agent's share of the machine's CPU since the last call (all cores = 100)."""
        now, cpu = self._clock(), self._cpu_time()
        (then, used), self._last = self._last, (now, cpu)
        if now <= then:
            return None
        cores = max(1, len(os.sched_getaffinity(0)))
        return round(min(100.0, 100.0 * (cpu - used) / (now - then) / cores), 1)

    @staticmethod
    def memory_bytes() -> int | None:
        try:
            with open("/proc/self/statm", encoding="ascii") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return None

    @staticmethod
    def memory_total_bytes() -> int | None:
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (OSError, ValueError):
            return None

    def disk_free_bytes(self) -> int | None:
        try:
            st = os.statvfs(self._state_dir)
        except OSError:
            return None
        return st.f_bavail * st.f_frsize

    @staticmethod
    def temperature_c(zones: Path = THERMAL_ZONES) -> float | None:
        """The hottest thermal zone, where the kernel has any (a Pi, a Jetson; not a VM)."""
        readings = []
        for zone in zones.glob("thermal_zone*/temp"):
            try:
                readings.append(int(zone.read_text().strip()) / 1000)
            except (OSError, ValueError):
                continue
        return round(max(readings), 1) if readings else None


def telemetry_body(
    window: TelemetryWindow,
    *,
    now: float,
    model: str | None,
    queue_depth: int,
    stats: SystemStats,
) -> dict[str, Any]:
    """The protocol's ``telemetry`` body for one window."""
    speeds, ttfts = sorted(window.tokens_per_s), sorted(window.ttft_ms)

    def rounded(value: float | None) -> float | None:
        return None if value is None else round(value, 2)

    return {
        "window_s": round(max(0.001, now - window.started), 3),
        "model": model,
        "requests": window.requests,
        "errors": window.errors,
        "tokens_per_s": {
            "p50": rounded(percentile(speeds, 0.5)),
            "p90": rounded(percentile(speeds, 0.9)),
        },
        "ttft_ms": {
            "p50": rounded(percentile(ttfts, 0.5)),
            "p90": rounded(percentile(ttfts, 0.9)),
        },
        "queue_depth": max(queue_depth, window.max_queue_depth),
        "cpu_percent": stats.cpu_percent(),
        "memory_bytes": stats.memory_bytes(),
        "memory_total_bytes": stats.memory_total_bytes(),
        "disk_free_bytes": stats.disk_free_bytes(),
        "temperature_c": stats.temperature_c(),
    }

"""How fast does the registry verify a model, and what does an interrupted download cost?

The project budgets the registry: "An interrupted download re-fetches at most one chunk.
Verification runs at disk speed." This script measures both on one model file (by default the
98 MB SmolLM2 GGUF), side by side in one run.

Verification. ``BlobStore.verify`` re-hashes a blob with ``hash_file`` (sha256 over 4 MiB
unbuffered reads). Four contenders:

* ``hash_file``: edgelm's, called in this process, exactly as ``BlobStore.verify`` calls it;
* ``sha256sum``: GNU coreutils in a subprocess, the reference a user would reach for (its wall
  time includes starting the process, which is measured separately and reported);
* ``read only``: the same 4 MiB unbuffered reads as ``hash_file`` with no hashing, which is
  what "disk speed" means here: the rate at which this machine can hand the file's bytes over;
* ``hashlib.sha256, no I/O`` (warm part only): the file's bytes, already in memory, hashed in
  one call: the CPU's hashing rate, so the most any verifier could reach on this machine.

With a warm page cache (the file is read once in full before the first timed run, and every
contender reads it again and again, so it stays cached) the rates are CPU-bound and show how
fast each contender hashes. With a cold cache (only as root, where ``sync; echo 1 >
/proc/sys/vm/drop_caches`` runs before every single timed read, emptying the page cache of the
whole machine; ``--no-cold`` skips it) they show the real disk path;
the budget is judged there, as ``hash_file``'s rate over ``read only``'s: at least
DISK_SPEED_RATIO counts as disk speed (the budget names no number). The verdict also gives the
ceiling, the in-memory hashing rate over the cold read rate, which tells whether a miss is the
CPU's or ``hash_file``'s. Without root the cold part is skipped and the budget is judged on the
warm numbers instead (``hash_file`` against ``sha256sum``), and the verdict says so.

Interrupted download. A separate process (forked, so it does not share the client's interpreter
and its GIL) serves the model file from memory with aiohttp on 127.0.0.1. Its handler honours
``Range: bytes=N-`` (206 with Content-Range), writes 256 KiB at a time, and counts every byte
it hands to the socket. On a ``cut`` URL it sends the first request only up to half the file
(``size // 2``), then closes the connection: the client sees a short body. Two contenders,
each calling :func:`edgelm_agent.registry.mirrors.download_resumable` into a fresh partial
file in a temporary directory, exactly as the registry does:

* uninterrupted: one call that fetches the whole file;
* interrupted + resumed: the first call fails with ``DownloadError`` mid-way, the second call
  (immediately, no back-off) resumes with a Range request from what the partial file holds.

Reported: the bytes sent again, which is the cut point minus the offset the second request
resumes from (``download_resumable`` appends each piece its HTTP stream hands over, at most
``mirrors.CHUNK_BYTES``; bytes received but not yet handed over when the connection drops are
lost and must come again); total bytes the server sent over the file's size; and the time of
interrupted + resumed over the time of an uninterrupted download, both in total (to the last
return, so including the final fsync) and to the moment the last piece is written (reported via
``download_resumable``'s progress callback, so before the fsync). The budget is judged on the
largest re-fetch over all repetitions, against ``mirrors.CHUNK_BYTES``. Every download is
checked against the model's sha256 afterwards (not timed), and the server's own log of each
request is checked against what the client did.

Method, and why. Timings on a small, shared machine are noisy, so single absolute numbers mean
little; the script runs ``--repeats`` repetitions, rotates the order of the contenders in each
repetition (so each takes every position in turn), and reports medians and
ratios of medians, plus the median of per-repetition ratios, which is steadier when the load
changes during the run. One warm-up download runs before the timed ones. The machine's load is
measured from /proc/stat while the benchmark runs (CPU time of other processes) and reported.

The result is printed as tables and written to ``docs/benchmarks.md`` between
``<!-- registry:begin -->`` and ``<!-- registry:end -->`` (``--no-write`` only prints;
``--json`` prints the raw results as JSON on stdout). The server process and the temporary
directory are removed on the way out, also on Ctrl-C, SIGTERM or an error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import importlib.metadata
import json
import multiprocessing
import os
import re
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import urllib3
from aiohttp import web
from rich.table import Table

from edgelm_agent.registry import blob_store, mirrors
from edgelm_agent.registry.blob_store import hash_file
from edgelm_agent.registry.errors import DownloadError
from edgelm_agent.registry.mirrors import download_resumable

if TYPE_CHECKING or __package__:  # mypy, or `python -m bench.registry`, from the repository's root
    from bench import harness
else:  # `python bench/registry.py` puts this folder on sys.path
    import harness

DEFAULT_MODEL = harness.REPO / "models" / "SmolLM2-135M-Instruct-Q4_1.gguf"
SECTION = "registry"
SECTION_BEGIN, SECTION_END = harness.markers(SECTION)
#: The section this one goes after when it is first written.
PRECEDING_SECTION = "serving"
REPRODUCE = "`python bench/registry.py --model models/SmolLM2-135M-Instruct-Q4_1.gguf`"

# The project's budgets for the registry.
BUDGET_REFETCH = "An interrupted download re-fetches at most one chunk."
BUDGET_DISK_SPEED = "Verification runs at disk speed."
REFETCH_BUDGET_BYTES = mirrors.CHUNK_BYTES
#: hash_file at this fraction of the plain read rate, or more, counts as "at disk speed".
DISK_SPEED_RATIO = 0.9

MB = 1_000_000  # rates are in MB/s, 10^6 bytes per second
MIB = 1 << 20
DROP_CACHES = Path("/proc/sys/vm/drop_caches")
SERVER_WRITE_BYTES = 256 << 10
SERVER_READY_TIMEOUT_S = 30.0
SERVER_STOP_TIMEOUT_S = 5.0
STARTUP_RUNS = 5

# Verification contenders, in table order, with their labels.
READ_ONLY = "read_only"
HASH_FILE = "hash_file"
SHA256SUM = "sha256sum"
HASH_MEMORY = "hash_memory"
VERIFY_LABELS = {
    HASH_FILE: "edgelm hash_file",
    SHA256SUM: "sha256sum (subprocess)",
    READ_ONLY: "read only, no hash",
    HASH_MEMORY: "hashlib.sha256, no I/O",
}
# Download contenders.
UNINTERRUPTED = "uninterrupted"
RESUMED = "interrupted_resumed"
DOWNLOAD_LABELS = {
    UNINTERRUPTED: "uninterrupted",
    RESUMED: "interrupted at 50% + resumed",
}


# --------------------------------------------------------------------------- verification


def read_only(path: Path) -> str | None:
    """hash_file's read loop without the hash: the rate the file's bytes arrive at."""
    with open(path, "rb", buffering=0) as f:
        buffer = bytearray(blob_store.CHUNK_BYTES)
        while f.readinto(buffer):
            pass
    return None


def edgelm_hash(path: Path) -> str | None:
    return hash_file(path)[0]


def sha256sum(path: Path) -> str | None:
    done = subprocess.run(
        ["sha256sum", "--", str(path)], check=True, capture_output=True, text=True
    )
    return done.stdout.split()[0]


Verifier = Callable[[Path], str | None]
VERIFIERS: dict[str, Verifier] = {
    HASH_FILE: edgelm_hash,
    SHA256SUM: sha256sum,
    READ_ONLY: read_only,
}


def memory_hasher(data: bytes) -> Verifier:
    """sha256 of the file's bytes already in memory: the CPU's hashing rate, with no I/O."""

    def hash_memory(path: Path) -> str | None:
        return hashlib.sha256(data).hexdigest()

    return hash_memory


def drop_caches() -> None:
    """Write back dirty pages, then evict the page cache (root only)."""
    os.sync()
    DROP_CACHES.write_text("1\n")


def can_drop_caches() -> bool:
    if os.geteuid() != 0 or not os.access(DROP_CACHES, os.W_OK):
        return False
    try:
        drop_caches()
    except OSError:
        return False
    return True


def rotated(keys: Sequence[str], repetition: int) -> list[str]:
    """The contenders in this repetition's order: each takes every position in turn."""
    shift = repetition % len(keys)
    return [*keys[shift:], *keys[:shift]]


def time_verifiers(
    verifiers: dict[str, Verifier],
    path: Path,
    expected: str,
    repeats: int,
    *,
    cold: bool,
    progress: harness.Progress,
) -> dict[str, list[float]]:
    """Seconds per full read of ``path``, per contender; sample ``i`` is from repetition ``i``."""
    keys = list(verifiers)
    seconds: dict[str, list[float]] = {key: [] for key in keys}
    for repetition in range(repeats):
        for key in rotated(keys, repetition):
            if cold:
                drop_caches()
            started = time.perf_counter()
            digest = verifiers[key](path)
            seconds[key].append(time.perf_counter() - started)
            if digest is not None and digest != expected:
                raise RuntimeError(f"{key} computed {digest}, hash_file {expected}")
        progress(
            f"verify {'cold' if cold else 'warm'} {repetition + 1}/{repeats}: "
            + ", ".join(
                f"{key} {path.stat().st_size / MB / seconds[key][-1]:.0f} MB/s" for key in keys
            )
        )
    return seconds


def process_startup_ms(workdir: Path) -> float:
    """Median wall time of ``sha256sum`` on an empty file: what starting it costs."""
    empty = workdir / "empty"
    empty.touch()
    runs = []
    for _ in range(STARTUP_RUNS):
        started = time.perf_counter()
        sha256sum(empty)
        runs.append(time.perf_counter() - started)
    return statistics.median(runs) * 1000


# --------------------------------------------------------------------------- the mirror server

RANGE = re.compile(r"bytes=(\d+)-(\d*)")


def serve(model: Path, conn: Connection) -> None:
    """The server process: serve ``model`` until terminated; sends its port down ``conn``."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops it, in order
    data = model.read_bytes()
    asyncio.run(_serve(data, conn))


async def _serve(data: bytes, conn: Connection) -> None:
    size = len(data)
    cut_at = size // 2
    view = memoryview(data)
    records: dict[str, list[dict[str, Any]]] = {}

    async def file_handler(request: web.Request) -> web.StreamResponse:
        token, mode = request.match_info["token"], request.match_info["mode"]
        seen = records.setdefault(token, [])
        start, stop = 0, size
        header = request.headers.get("Range")
        if header is not None:
            match = RANGE.fullmatch(header.strip())
            if match is None or int(match[1]) >= size:
                return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})
            start = int(match[1])
            stop = min(size, int(match[2]) + 1) if match[2] else size
        response = web.StreamResponse(status=206 if header is not None else 200)
        response.content_length = stop - start
        response.headers["Accept-Ranges"] = "bytes"
        if header is not None:
            response.headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
        cut = mode == "cut" and not seen and start < cut_at
        record: dict[str, Any] = {"range_start": start, "bytes_sent": 0, "cut": cut}
        seen.append(record)
        await response.prepare(request)
        end = min(stop, cut_at) if cut else stop
        position = start
        try:
            while position < end:
                n = min(SERVER_WRITE_BYTES, end - position)
                record["bytes_sent"] += n  # counted before the write: the client can't be ahead
                await response.write(view[position : position + n])
                position += n
        except ConnectionError:  # the client went away (the benchmark was interrupted)
            return response
        if cut:
            # close() sends what is buffered, then FIN: the client gets a short body.
            if request.transport is not None:
                request.transport.close()
            return response
        await response.write_eof()
        return response

    async def stats_handler(request: web.Request) -> web.Response:
        return web.json_response(records.get(request.match_info["token"], []))

    app = web.Application()
    app.router.add_get("/t/{token}/{mode:full|cut}/{name}", file_handler)
    app.router.add_get("/stats/{token}", stats_handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        conn.send(int(runner.addresses[0][1]))
        await asyncio.Event().wait()  # until SIGTERM
    finally:
        await runner.cleanup()


class MirrorServer:
    """The server process; :meth:`stop` is safe to call at any time."""

    def __init__(self, model: Path) -> None:
        context = multiprocessing.get_context("fork")
        receiver, sender = context.Pipe(duplex=False)
        self.process = context.Process(target=serve, args=(model, sender), daemon=True)
        self.process.start()
        sender.close()
        try:
            if not receiver.poll(SERVER_READY_TIMEOUT_S):
                raise TimeoutError(f"the mirror server did not start in {SERVER_READY_TIMEOUT_S} s")
            self.port = int(receiver.recv())
        except BaseException:
            self.stop()
            raise
        finally:
            receiver.close()
        self.base = f"http://127.0.0.1:{self.port}"
        self._pool = urllib3.PoolManager(retries=False)

    def mirror(self, token: str, *, cut: bool) -> str:
        return f"{self.base}/t/{token}/{'cut' if cut else 'full'}"

    def records(self, token: str) -> list[dict[str, Any]]:
        response = self._pool.request("GET", f"{self.base}/stats/{token}")
        if response.status != 200:
            raise RuntimeError(f"stats: HTTP {response.status}")
        records = json.loads(response.data)
        assert isinstance(records, list)
        return records

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited after a while."""
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(SERVER_STOP_TIMEOUT_S)
            if self.process.is_alive():
                self.process.kill()
        self.process.join()


@contextlib.contextmanager
def mirror_server(model: Path) -> Iterator[MirrorServer]:
    server = MirrorServer(model)
    try:
        yield server
    finally:
        server.stop()


# --------------------------------------------------------------------------- downloads


@dataclass(frozen=True)
class DownloadSample:
    #: From the first call to the last return, including the final flush and fsync.
    seconds: float
    #: From the first call until the last piece was written, before the final fsync.
    to_last_write_seconds: float
    #: Where the second request resumed (the partial file's size after the failure).
    resume_offset: int | None
    #: Bytes the server sent in all requests for this download.
    bytes_sent: int
    requests: int
    #: Bytes the server had sent before the cut and had to send again; 0 if not interrupted.
    refetched: int


def download_once(
    server: MirrorServer,
    workdir: Path,
    token: str,
    size: int,
    expected: str,
    *,
    interrupted: bool,
) -> DownloadSample:
    """One download into a fresh partial file, timed from the first call to the last return."""
    partial = workdir / f"{token}.partial"
    mirror = server.mirror(token, cut=interrupted)
    name = f"{expected}.model.gguf"  # the registry's naming for a target file
    resume_offset: int | None = None
    last_write = 0.0

    def on_bytes(n: int) -> None:  # called after each piece is written, before the fsync
        nonlocal last_write
        last_write = time.perf_counter()

    try:
        started = time.perf_counter()
        if interrupted:
            try:
                download_resumable([mirror], name, partial, size, progress=on_bytes)
            except DownloadError:
                resume_offset = partial.stat().st_size if partial.exists() else 0
            else:
                raise RuntimeError("the server was to cut the first request, but it completed")
        fetched = download_resumable([mirror], name, partial, size, progress=on_bytes)
        finished = time.perf_counter()
        digest, length = hash_file(partial)
        if (digest, length) != (expected, size):
            raise RuntimeError(f"download {token} has sha256 {digest}, length {length}")
    finally:
        partial.unlink(missing_ok=True)
    records = server.records(token)
    timing = (finished - started, last_write - started)
    return check_records(records, size, fetched, resume_offset, timing)


def check_records(
    records: list[dict[str, Any]],
    size: int,
    fetched: int,
    resume_offset: int | None,
    timing: tuple[float, float],
) -> DownloadSample:
    """Cross-check the server's log of the requests with what the client saw."""
    sent = sum(int(r["bytes_sent"]) for r in records)
    seconds, to_last_write = timing
    if resume_offset is None:
        if len(records) != 1 or sent != size or fetched != size:
            raise RuntimeError(f"uninterrupted download: unexpected requests {records}")
        return DownloadSample(seconds, to_last_write, None, sent, 1, 0)
    first, second = records[0] if records else {}, records[1] if len(records) > 1 else {}
    if (
        len(records) != 2
        or not first.get("cut")
        or int(first["bytes_sent"]) != size // 2
        or int(second["range_start"]) != resume_offset
        or int(second["bytes_sent"]) != fetched
        or resume_offset + fetched != size
    ):
        raise RuntimeError(f"interrupted download: unexpected requests {records}")
    return DownloadSample(
        seconds=seconds,
        to_last_write_seconds=to_last_write,
        resume_offset=resume_offset,
        bytes_sent=sent,
        requests=len(records),
        refetched=size // 2 - resume_offset,
    )


def time_downloads(
    server: MirrorServer,
    workdir: Path,
    size: int,
    expected: str,
    repeats: int,
    progress: harness.Progress,
) -> dict[str, list[DownloadSample]]:
    """One warm-up, then ``repeats`` repetitions of both, alternating which goes first."""
    download_once(server, workdir, "warm-up", size, expected, interrupted=False)
    keys = [UNINTERRUPTED, RESUMED]
    samples: dict[str, list[DownloadSample]] = {key: [] for key in keys}
    for repetition in range(repeats):
        for key in rotated(keys, repetition):
            samples[key].append(
                download_once(
                    server,
                    workdir,
                    f"{key}-{repetition}",
                    size,
                    expected,
                    interrupted=key == RESUMED,
                )
            )
        resumed = samples[RESUMED][-1]
        progress(
            f"download {repetition + 1}/{repeats}: uninterrupted "
            f"{samples[UNINTERRUPTED][-1].seconds:.2f} s, resumed {resumed.seconds:.2f} s, "
            f"re-fetched {resumed.refetched} bytes"
        )
    return samples


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class VerifyRow:
    key: str
    label: str
    cache: str
    runs: int
    mb_per_s: float
    mb_per_s_p25: float
    mb_per_s_p75: float
    ratio_vs_sha256sum: float
    #: Median over repetitions of this repetition's rate over sha256sum's.
    paired_ratio_vs_sha256sum: float
    ratio_vs_read_only: float
    paired_ratio_vs_read_only: float


def summarize_verification(
    seconds: dict[str, list[float]], size: int, cache: str
) -> list[VerifyRow]:
    rates = {key: [size / MB / s for s in runs] for key, runs in seconds.items()}
    medians = {key: statistics.median(runs) for key, runs in rates.items()}

    rows = []
    for key, label in VERIFY_LABELS.items():
        if key not in rates:
            continue
        p25, p75 = harness.quartiles(rates[key])
        rows.append(
            VerifyRow(
                key=key,
                label=label,
                cache="no file" if key == HASH_MEMORY else cache,
                runs=len(rates[key]),
                mb_per_s=medians[key],
                mb_per_s_p25=p25,
                mb_per_s_p75=p75,
                ratio_vs_sha256sum=medians[key] / medians[SHA256SUM],
                paired_ratio_vs_sha256sum=harness.paired_ratio(rates[key], rates[SHA256SUM]),
                ratio_vs_read_only=medians[key] / medians[READ_ONLY],
                paired_ratio_vs_read_only=harness.paired_ratio(rates[key], rates[READ_ONLY]),
            )
        )
    return rows


@dataclass(frozen=True)
class DownloadRow:
    key: str
    label: str
    runs: int
    median_s: float
    mb_per_s: float
    time_ratio_vs_uninterrupted: float
    #: Median over repetitions of this repetition's time over the uninterrupted one's.
    paired_time_ratio_vs_uninterrupted: float
    #: The same two ratios for the time until the last piece was written (before the fsync).
    to_last_write_ratio_vs_uninterrupted: float
    paired_to_last_write_ratio_vs_uninterrupted: float
    #: Median time of the final flush and fsync, after the last piece.
    final_fsync_ms: float
    requests: int
    median_bytes_sent: float
    sent_over_size: float
    refetched_median: float
    refetched_max: int


def summarize_downloads(samples: dict[str, list[DownloadSample]], size: int) -> list[DownloadRow]:
    def ratios(mine: list[float], base: list[float]) -> tuple[float, float]:
        return statistics.median(mine) / statistics.median(base), harness.paired_ratio(mine, base)

    base = [s.seconds for s in samples[UNINTERRUPTED]]
    base_to_last = [s.to_last_write_seconds for s in samples[UNINTERRUPTED]]
    rows = []
    for key, label in DOWNLOAD_LABELS.items():
        runs = samples[key]
        times = [s.seconds for s in runs]
        to_last = [s.to_last_write_seconds for s in runs]
        median_s = statistics.median(times)
        total_ratio, total_paired = ratios(times, base)
        to_last_ratio, to_last_paired = ratios(to_last, base_to_last)
        sent = statistics.median(s.bytes_sent for s in runs)
        rows.append(
            DownloadRow(
                key=key,
                label=label,
                runs=len(runs),
                median_s=median_s,
                mb_per_s=size / MB / median_s,
                time_ratio_vs_uninterrupted=total_ratio,
                paired_time_ratio_vs_uninterrupted=total_paired,
                to_last_write_ratio_vs_uninterrupted=to_last_ratio,
                paired_to_last_write_ratio_vs_uninterrupted=to_last_paired,
                final_fsync_ms=statistics.median(s.seconds - s.to_last_write_seconds for s in runs)
                * 1000,
                requests=max(s.requests for s in runs),
                median_bytes_sent=sent,
                sent_over_size=sent / size,
                refetched_median=statistics.median(s.refetched for s in runs),
                refetched_max=max(s.refetched for s in runs),
            )
        )
    return rows


@dataclass(frozen=True)
class Verdict:
    budget: str
    met: bool
    detail: str

    def describe(self) -> str:
        return f'"{self.budget}" **{"met" if self.met else "missed"}**: {self.detail}'


def refetch_verdict(rows: Sequence[DownloadRow], size: int) -> Verdict:
    resumed = next(r for r in rows if r.key == RESUMED)
    met = resumed.refetched_max <= REFETCH_BUDGET_BYTES
    return Verdict(
        BUDGET_REFETCH,
        met,
        f"the server cut the first request at {size // 2:,} bytes (50%); the resumed request "
        f"started at most {resumed.refetched_max:,} bytes earlier "
        f"({resumed.refetched_max / MIB:.2f} MiB; median {resumed.refetched_median:,.0f} bytes), "
        f"against one chunk of {REFETCH_BUDGET_BYTES:,} bytes (`mirrors.CHUNK_BYTES`).",
    )


def disk_speed_verdict(warm: Sequence[VerifyRow], cold: Sequence[VerifyRow] | None) -> Verdict:
    def find(rows: Sequence[VerifyRow], key: str) -> VerifyRow:
        return next(r for r in rows if r.key == key)

    warm_hash, warm_sum = find(warm, HASH_FILE), find(warm, SHA256SUM)
    cpu = find(warm, HASH_MEMORY)
    if cold is None:
        return Verdict(
            BUDGET_DISK_SPEED,
            warm_hash.ratio_vs_sha256sum >= DISK_SPEED_RATIO,
            f"judged without a cold-cache run (not root, or drop_caches not writable): with "
            f"the file cached, hash_file hashes at {warm_hash.mb_per_s:.0f} MB/s, "
            f"{warm_hash.ratio_vs_sha256sum:.2f}x sha256sum's {warm_sum.mb_per_s:.0f} MB/s; "
            "whether that keeps up with the disk was not measured.",
        )
    cold_hash, cold_read = find(cold, HASH_FILE), find(cold, READ_ONLY)
    met = cold_hash.ratio_vs_read_only >= DISK_SPEED_RATIO
    ceiling = min(cpu.mb_per_s, cold_read.mb_per_s) / cold_read.mb_per_s
    in_turn = 1 / (1 / cpu.mb_per_s + 1 / cold_read.mb_per_s)
    if ceiling >= DISK_SPEED_RATIO:
        reachable = "the target is within reach of a sha256 that keeps the disk busy"
    else:
        reachable = (
            "on this CPU even a sha256 that kept the disk busy all the time would miss the target"
        )
    return Verdict(
        BUDGET_DISK_SPEED,
        met,
        f"from a cold page cache hash_file reads and hashes at {cold_hash.mb_per_s:.0f} MB/s, "
        f"{cold_hash.ratio_vs_read_only:.2f}x the plain read rate of {cold_read.mb_per_s:.0f} "
        f"MB/s (median of per-repetition ratios {cold_hash.paired_ratio_vs_read_only:.2f}; "
        f"target >= {DISK_SPEED_RATIO:g}). This CPU hashes bytes already in memory at "
        f"{cpu.mb_per_s:.0f} MB/s, so the best a single-threaded sha256 could do here is "
        f"{ceiling:.2f}x the read rate: {reachable}. hash_file reads the next chunk in a helper "
        f"thread while it hashes the current one; reading and hashing strictly in turn would "
        f"give {in_turn:.0f} MB/s. hash_file is "
        f"{cold_hash.ratio_vs_sha256sum:.2f}x as fast as sha256sum cold and "
        f"{warm_hash.ratio_vs_sha256sum:.2f}x warm.",
    )


# --------------------------------------------------------------------------- environment


def sha256sum_version() -> str:
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        done = subprocess.run(
            ["sha256sum", "--version"], check=True, capture_output=True, text=True
        )
        return done.stdout.splitlines()[0]
    return "unknown"


@dataclass(frozen=True)
class Environment(harness.Environment):
    python: str
    openssl: str
    sha256sum: str
    aiohttp: str
    urllib3: str


# --------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class Settings:
    model: Path
    repeats: int
    cold: bool


@dataclass(frozen=True)
class Report:
    settings: Settings
    environment: Environment
    size: int
    sha256: str
    sha256sum_startup_ms: float
    #: Whether the cold-cache part ran (it needs root).
    cold_measured: bool
    warm: list[VerifyRow]
    cold: list[VerifyRow] | None
    downloads: list[DownloadRow]
    command: str

    def verdicts(self) -> list[Verdict]:
        return [
            refetch_verdict(self.downloads, self.size),
            disk_speed_verdict(self.warm, self.cold),
        ]

    def as_json(self) -> dict[str, Any]:
        return {
            "settings": harness.json_fields(self.settings),
            "environment": asdict(self.environment),
            "file": {"bytes": self.size, "sha256": self.sha256},
            "sha256sum_startup_ms": self.sha256sum_startup_ms,
            "verification": {
                "warm": {row.key: asdict(row) for row in self.warm},
                "cold": {row.key: asdict(row) for row in self.cold} if self.cold else None,
            },
            "download": {row.key: asdict(row) for row in self.downloads},
            "budgets": [
                {"budget": v.budget, "met": v.met, "detail": v.detail} for v in self.verdicts()
            ],
            "thresholds": {
                "refetch_max_bytes": REFETCH_BUDGET_BYTES,
                "disk_speed_min_ratio": DISK_SPEED_RATIO,
            },
            "command": self.command,
        }


def measure(settings: Settings, command: str, progress: harness.Progress) -> Report:
    start = harness.RunStart.now()
    model, repeats = settings.model, settings.repeats
    size = model.stat().st_size
    with harness.temp_dir("edgelm-bench-registry-") as workdir:
        progress("reading the file once to warm the page cache")
        data = model.read_bytes()
        expected, _ = hash_file(model)
        startup_ms = process_startup_ms(workdir)
        warm_verifiers = {**VERIFIERS, HASH_MEMORY: memory_hasher(data)}
        warm = time_verifiers(
            warm_verifiers, model, expected, repeats, cold=False, progress=progress
        )
        del warm_verifiers, data
        cold_measured = settings.cold and can_drop_caches()
        cold = None
        if cold_measured:
            cold = time_verifiers(VERIFIERS, model, expected, repeats, cold=True, progress=progress)
        elif settings.cold:
            progress("cannot drop the page cache (needs root): no cold-cache numbers")
        progress("starting the mirror server")
        with mirror_server(model) as server:
            downloads = time_downloads(server, workdir, size, expected, repeats, progress)
    return Report(
        settings=settings,
        environment=Environment.measured(
            start,
            python=harness.python_version(),
            openssl=ssl.OPENSSL_VERSION,
            sha256sum=sha256sum_version(),
            aiohttp=aiohttp.__version__,
            urllib3=importlib.metadata.version("urllib3"),
        ),
        size=size,
        sha256=expected,
        sha256sum_startup_ms=startup_ms,
        cold_measured=cold_measured,
        warm=summarize_verification(warm, size, "warm"),
        cold=summarize_verification(cold, size, "cold") if cold is not None else None,
        downloads=summarize_downloads(downloads, size),
        command=command,
    )


# --------------------------------------------------------------------------- output


VERIFY_HEADINGS = [
    "contender",
    "page cache",
    "median MB/s",
    "MB/s p25..p75",
    "ratio to sha256sum",
    "ratio to read only",
]
DOWNLOAD_HEADINGS = [
    "download",
    "time ratio to uninterrupted, total",
    "time ratio to uninterrupted, to last write",
    "median MB/s, total",
    "final fsync, median ms",
    "requests",
    "bytes sent / file size",
    "bytes re-fetched, median (max)",
]


def verify_cells(row: VerifyRow) -> list[str]:
    return [
        row.label,
        row.cache,
        f"{row.mb_per_s:.0f}",
        f"{row.mb_per_s_p25:.0f}..{row.mb_per_s_p75:.0f}",
        f"{row.ratio_vs_sha256sum:.2f} ({row.paired_ratio_vs_sha256sum:.2f})",
        f"{row.ratio_vs_read_only:.2f} ({row.paired_ratio_vs_read_only:.2f})",
    ]


def download_cells(row: DownloadRow) -> list[str]:
    return [
        row.label,
        f"{row.time_ratio_vs_uninterrupted:.2f} ({row.paired_time_ratio_vs_uninterrupted:.2f})",
        f"{row.to_last_write_ratio_vs_uninterrupted:.2f} "
        f"({row.paired_to_last_write_ratio_vs_uninterrupted:.2f})",
        f"{row.mb_per_s:.0f}",
        f"{row.final_fsync_ms:.0f}",
        str(row.requests),
        f"{row.sent_over_size:.4f}",
        f"{row.refetched_median:,.0f} ({row.refetched_max:,})",
    ]


def verify_rows(report: Report) -> list[VerifyRow]:
    return [*report.warm, *(report.cold or [])]


def rich_tables(report: Report) -> list[Table]:
    verify = harness.rich_table(
        f"Verification of {report.settings.model.name} ({report.size / MB:.0f} MB)",
        VERIFY_HEADINGS,
        [verify_cells(row) for row in verify_rows(report)],
        left=2,
    )
    download = harness.rich_table(
        "Download over loopback HTTP, cut at 50% and resumed",
        DOWNLOAD_HEADINGS,
        [download_cells(row) for row in report.downloads],
    )
    return [verify, download]


def run_facts(report: Report) -> list[str]:
    s, env = report.settings, report.environment
    cold = (
        "yes, `sync; echo 1 > /proc/sys/vm/drop_caches` before every cold read"
        if report.cold_measured
        else "no (needs root)"
    )
    return [
        *harness.machine_facts(env),
        f"- File: `{s.model.name}`, {report.size:,} bytes ({report.size / MB:.1f} MB)",
        f"- Repetitions: {s.repeats} per contender, order rotated each repetition; "
        f"one warm-up download first. Cold-cache runs: {cold}",
        f"- Python {env.python} ({env.openssl}), {env.sha256sum}, aiohttp {env.aiohttp}, "
        f"urllib3 {env.urllib3}",
        f"- Chunk sizes: `hash_file` reads {blob_store.CHUNK_BYTES // MIB} MiB; "
        f"`download_resumable` writes pieces of at most {mirrors.CHUNK_BYTES // MIB} MiB; "
        f"the server writes {SERVER_WRITE_BYTES // 1024} KiB at a time",
        f"- This run: `{report.command}`",
        f"- Reproduce: {REPRODUCE}",
    ]


def markdown_section(report: Report) -> str:
    parts = [
        SECTION_BEGIN,
        "## Registry: verification and resumed downloads (`bench/registry.py`)",
        "",
        "How fast `BlobStore.verify` re-hashes a model (it runs `hash_file`), next to "
        "`sha256sum` and to reading the file without hashing; and what an interrupted "
        "download costs when `download_resumable` resumes it with a Range request. Medians "
        "over repetitions in one run, in rotating order; ratios are what to read, absolute "
        "numbers depend on the machine, its disk and its load. The script's docstring explains "
        "the method.",
        "",
        *run_facts(report),
        "",
        *harness.caution(report.environment),
        "### Verification",
        "",
        "Warm: the file was read once in full before the first timed run, so it is in the page "
        "cache for every warm run, and the rates show hashing speed. "
        + (
            "Cold: the page cache was dropped before every single timed read, so the rates show "
            "the disk path. "
            if report.cold_measured
            else "No cold-cache runs (they need root to drop the page cache). "
        )
        + "The budget counts `hash_file` from a cold cache at "
        f"{DISK_SPEED_RATIO:g}x the plain read rate or more as disk speed (the budget names no "
        "number; the threshold is this script's). "
        "`hashlib.sha256, no I/O` hashes the file's bytes already in memory: the CPU's "
        "hashing rate, the most any verifier can reach on this machine. "
        + f"MB = 10^6 bytes. `sha256sum` runs as a subprocess; starting it costs "
        f"{report.sha256sum_startup_ms:.1f} ms (median, on an empty file), which is included in "
        "its times. Ratios are of medians, with the median of per-repetition ratios in "
        "parentheses.",
        "",
        harness.markdown_table(
            VERIFY_HEADINGS, [verify_cells(r) for r in verify_rows(report)], left=2
        ),
        "",
        "### Interrupted download",
        "",
        "A forked aiohttp server on 127.0.0.1 serves the file from memory with Range support. "
        "For the interrupted download it sends the first request only up to half the file, then "
        "closes the connection; `download_resumable` fails with `DownloadError`, and a second "
        "call, straight away, resumes from what the partial file holds. Times run from the first "
        "call to the last return (including the final fsync); every result was checked against "
        "the file's sha256. Bytes sent are counted by the server; re-fetched bytes are the cut "
        "point minus where the resumed request started.",
        "",
        harness.markdown_table(DOWNLOAD_HEADINGS, [download_cells(r) for r in report.downloads]),
        "",
        "Time ratios are of medians, with the median of per-repetition ratios in parentheses. "
        "*To last write* stops the clock when the last piece is written, before the final "
        "fsync: there the resumed download pays for its second connection, the failed call's "
        "cleanup and any re-sent bytes. Its final fsync has less left to write, presumably "
        "because the kernel has begun writing the first half back by then, which is why the "
        "total ratio comes out near 1. Loopback moves about a gigabyte per second, so these "
        "fixed costs weigh far more here than on a real network, where the cost of the "
        "interruption is the re-sent bytes (see bytes sent / file size) and one round trip. "
        "`download_resumable` appends each piece its HTTP stream hands over, at most "
        f"{mirrors.CHUNK_BYTES // MIB} MiB; what had arrived but was not yet handed over when "
        "the connection dropped is lost and sent again, which is what the budget bounds. A "
        "stream that only handed over whole chunks would lose the cut offset modulo the chunk "
        f"size, here {report.size // 2 % mirrors.CHUNK_BYTES:,} bytes.",
        "",
        "Budgets:",
        "",
        *(f"- {v.describe()}" for v in report.verdicts()),
        SECTION_END,
    ]
    return "\n".join(parts) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = harness.argument_parser(
        "Registry verification throughput (hash_file vs sha256sum) and the cost of "
        "an interrupted, resumed download."
    )
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="model file to use")
    parser.add_argument("--repeats", type=int, default=15, help="repetitions per contender")
    parser.add_argument(
        "--no-cold", action="store_true", help="skip the cold-cache runs even as root"
    )
    harness.add_output_options(parser, json_help="print the raw results as JSON on stdout")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("need --repeats >= 1")
    if not args.model.is_file():
        parser.error(f"no model at {args.model} (`make model` fetches the default one)")
    if shutil.which("sha256sum") is None:
        parser.error("sha256sum (GNU coreutils) is not on PATH")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Settings(model=args.model.resolve(), repeats=args.repeats, cold=not args.no_cold)
    console, log = harness.start_run(args, width=160)
    try:
        report = measure(settings, harness.this_command(), lambda message: log.log(message))
    except KeyboardInterrupt:
        log.print("interrupted; server stopped, temporary files removed")
        return 130
    for table in rich_tables(report):
        console.print(table)
    for verdict in report.verdicts():
        console.print(verdict.describe().replace("**", ""))
    harness.print_caution(console, report.environment)
    harness.publish(
        args,
        console,
        SECTION,
        report.as_json,
        lambda: markdown_section(report),
        after=PRECEDING_SECTION,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

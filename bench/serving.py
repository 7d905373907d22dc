"""How much does serving through the agent cost, next to llama-cpp-python in-process?

The project budgets it: streaming through the agent's HTTP or Unix socket reaches at least 98% of
the tokens per second llama-cpp-python reaches in-process on the same model, threads and prompt,
and adds at most 5 ms to the time to first token. This script measures five contenders:

* ``create_completion``: ``Llama.create_completion(prompt, stream=True)`` in this process, the
  path a user of llama-cpp-python takes first. The design's baseline.
* ``generate``: the raw ``Llama.generate()`` token loop in this process, which is what the agent
  runs internally, so the tightest baseline there is (it does not even turn tokens into text).
* the agent over loopback HTTP and over its Unix socket (an aiohttp client, SSE).
* ``llama_cpp.server``, llama-cpp-python's own OpenAI server, over loopback HTTP.

Every contender gets the same model, threads, context size, plain-text prompt and ``max_tokens``,
greedy (temperature 0), through ``/v1/completions`` on both servers so no chat template applies.
Each run must produce exactly ``max_tokens`` tokens; a prompt that reaches end of sequence
earlier is refused, since a shorter run would not be comparable.

Definitions, measured on the client side (for in-process, on the Python iterator):

* time to first token (TTFT): from sending the request to the first non-empty text chunk;
* tokens/s: ``(tokens - 1) / (time of last token - time of first token)``, so prompt processing
  and the first token's latency stay out of the rate.

Method, and why. Timings on a small, shared machine are noisy, so a single absolute number means
little; ratios measured side by side in one run mean more. The servers start once, the in-process
model loads once, every contender is warmed up once, then the contenders alternate round-robin
for ``--rounds`` rounds, in a freshly shuffled order each round, and medians are compared. Only
one contender generates at a time, so none of them steals cores from another.

llama.cpp's worker threads keep spinning on the CPU for a moment after a generation ends (this
build of ggml uses OpenMP, whose idle threads spin-wait for more work before they sleep). On two
cores that slows down whichever run comes next, in another process. So every run starts after
``--pause-s`` seconds of quiet, and the script measures the effect itself: pairs of (agent run,
in-process ``generate`` run) with no pause and with ``--pause-s`` in between, plus the cores this
process still burns in the 20 ms and the 200 ms after an in-process generation, reported next to
the table.

All runs repeat one prompt, so every contender reuses its KV cache for the prompt (llama-cpp-
python's prefix match) and evaluates only its last token again: TTFT is then one decode step
plus the serving path's own latency, which is the overhead this benchmark is after. HTTP clients
keep their connection alive between runs, as an OpenAI client does.

The result is printed as a table and written to ``docs/benchmarks.md`` between
``<!-- serving:begin -->`` and ``<!-- serving:end -->`` (``--no-write`` only prints; ``--json``
prints the raw medians as JSON on stdout). Every process it starts is stopped on the way out,
also on Ctrl-C, SIGTERM or an error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp
import llama_cpp
from rich.table import Table

from edgelm_agent.registry.registry import name_from_filename

if TYPE_CHECKING or __package__:  # mypy, or `python -m bench.serving`, from the repository's root
    from bench import harness
else:  # `python bench/serving.py` puts this folder on sys.path
    import harness

DEFAULT_MODEL = harness.REPO / "models" / "SmolLM2-135M-Instruct-Q4_1.gguf"
DEFAULT_PROMPT = "Once upon a time, in a small village by the sea,"
SECTION = "serving"
SECTION_BEGIN, SECTION_END = harness.markers(SECTION)
REPRODUCE = (
    "`make bench`, which runs "
    "`python bench/serving.py --model models/SmolLM2-135M-Instruct-Q4_1.gguf`"
)

# The project's budgets for the agent.
TPS_RATIO_TARGET = 0.98
TTFT_DELTA_TARGET_MS = 5.0

READY_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_S = 600.0

# Contender keys, in table order, with their labels.
COMPLETION = "inprocess_create_completion"
GENERATE = "inprocess_generate"
AGENT_HTTP = "agent_http"
AGENT_UNIX = "agent_unix"
LLAMA_SERVER = "llama_cpp_server_http"
LABELS = {
    COMPLETION: "in-process create_completion",
    GENERATE: "in-process generate()",
    AGENT_HTTP: "agent, HTTP",
    AGENT_UNIX: "agent, Unix socket",
    LLAMA_SERVER: "llama_cpp.server, HTTP",
}
AGENT_KEYS = (AGENT_HTTP, AGENT_UNIX)


# --------------------------------------------------------------------------- one run's timings


class ShortRunError(RuntimeError):
    """A run produced fewer (or more) tokens than asked: its rate is not comparable."""


@dataclass(frozen=True)
class Sample:
    """One streamed generation, timed on the consumer's side."""

    ttft_s: float
    tokens_per_s: float
    tokens: int
    text: str


class TokenClock:
    """Timestamps the pieces of one streamed generation as the consumer receives them."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.stamps: list[float] = []
        self.pieces: list[str] = []

    def piece(self, text: str) -> None:
        if text:
            self.stamps.append(time.perf_counter())
            self.pieces.append(text)

    def token(self) -> None:
        """For a consumer that counts tokens rather than text pieces."""
        self.stamps.append(time.perf_counter())

    def sample(self, name: str, expected: int, usage_tokens: int | None = None) -> Sample:
        chunks = len(self.stamps)
        tokens = usage_tokens if usage_tokens is not None else chunks
        if tokens != expected or chunks != expected:
            raise ShortRunError(
                f"{name}: asked for {expected} tokens, got {tokens} in {chunks} text chunks; "
                "the prompt probably reaches end of sequence early, pick another with --prompt"
            )
        decode_s = self.stamps[-1] - self.stamps[0]
        return Sample(
            ttft_s=self.stamps[0] - self.started,
            tokens_per_s=(tokens - 1) / decode_s if decode_s > 0 else float("inf"),
            tokens=tokens,
            text="".join(self.pieces),
        )


# --------------------------------------------------------------------------- contenders


class Contender(Protocol):
    key: str

    async def run(self, max_tokens: int) -> Sample: ...


@dataclass
class InProcessCompletion:
    """``Llama.create_completion(stream=True)``, the obvious llama-cpp-python path."""

    llm: Any
    prompt: str
    key: str = COMPLETION

    async def run(self, max_tokens: int) -> Sample:
        # Blocks the event loop on purpose: nothing else may run while this generates.
        clock = TokenClock()
        chunks = self.llm.create_completion(
            self.prompt, max_tokens=max_tokens, temperature=0, stream=True
        )
        for chunk in chunks:
            clock.piece(chunk["choices"][0]["text"])
        return clock.sample(self.key, max_tokens)


@dataclass
class InProcessGenerate:
    """The raw ``Llama.generate()`` token loop, as the agent's llama.cpp backend drives it."""

    llm: Any
    prompt: str
    key: str = GENERATE

    async def run(self, max_tokens: int) -> Sample:
        llm = self.llm
        is_eog = llama_cpp.llama_vocab_is_eog
        vocab = llm._model.vocab
        clock = TokenClock()
        prompt = llm.tokenize(self.prompt.encode(), add_bos=True, special=True)
        tokens = llm.generate(
            prompt, temp=0.0, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.0
        )
        produced: list[int] = []
        try:
            for token in tokens:
                if is_eog(vocab, token):
                    break
                clock.token()
                produced.append(token)
                if len(produced) >= max_tokens:
                    break
        finally:
            tokens.close()
        clock.pieces = [llm.detokenize(produced).decode("utf-8", errors="replace")]
        return clock.sample(self.key, max_tokens)


@dataclass
class StreamingClient:
    """``POST /v1/completions`` with ``stream: true`` on one kept-alive aiohttp session."""

    key: str
    session: aiohttp.ClientSession
    url: str
    model: str
    prompt: str
    #: Server-specific request fields.
    extra: dict[str, Any]

    async def run(self, max_tokens: int) -> Sample:
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": self.prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            **self.extra,
        }
        clock = TokenClock()
        usage_tokens: int | None = None
        async with self.session.post(self.url, json=body) as response:
            if response.status != 200:
                raise RuntimeError(f"{self.key}: HTTP {response.status}: {await response.text()}")
            async for line in response.content:
                payload = parse_sse_line(line)
                if payload is None:
                    continue
                for choice in payload.get("choices") or []:
                    clock.piece(choice.get("text") or "")
                usage = payload.get("usage")
                if isinstance(usage, dict):
                    usage_tokens = int(usage["completion_tokens"])
        return clock.sample(self.key, max_tokens, usage_tokens)


def parse_sse_line(line: bytes) -> dict[str, Any] | None:
    """The JSON of one ``data:`` line, or None for blank lines, comments and ``[DONE]``."""
    if not line.startswith(b"data:"):
        return None
    data = line[len(b"data:") :].strip()
    if not data or data == b"[DONE]":
        return None
    payload = json.loads(data)
    return payload if isinstance(payload, dict) else None


#: The agent reports the tokens it generated in a last chunk when asked.
AGENT_EXTRA: dict[str, Any] = {"stream_options": {"include_usage": True}}
AGENT_UNIX_URL = "http://localhost/v1/completions"
#: llama_cpp.server sends no usage when streaming, and its requests default to a repeat penalty
#: of 1.1 where llama-cpp-python's API and the agent use 1.0. Even greedy decoding applies the
#: penalty, so without this it would produce other tokens, and be doing other work.
LLAMA_SERVER_EXTRA: dict[str, Any] = {"repeat_penalty": 1.0}


# --------------------------------------------------------------------------- server processes


def start_agent(
    model: Path, workdir: Path, *, threads: int, n_ctx: int
) -> tuple[harness.AgentProcess, Path, int]:
    """Start ``edgelm agent run``; returns the process, its socket and its HTTP port."""
    options = ["--model", str(model), "--threads", str(threads), "--context-length", str(n_ctx)]
    agent = harness.AgentProcess("agent", workdir, *options)
    return agent, agent.socket, agent.port


def start_llama_server(
    model: Path, workdir: Path, *, threads: int, n_ctx: int
) -> tuple[harness.ServerProcess, int]:
    """Start ``python -m llama_cpp.server`` with its defaults otherwise; returns it and its port."""
    port = harness.free_port()
    args = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(model),
        "--n_threads",
        str(threads),
        "--n_threads_batch",
        str(threads),
        "--n_ctx",
        str(n_ctx),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    return harness.ServerProcess("llama_cpp.server", args, workdir / "llama_cpp_server.log"), port


async def wait_ready(
    server: harness.ServerProcess, session: aiohttp.ClientSession, url: str, timeout_s: float
) -> None:
    """Poll ``url`` until it answers 200; fail early if the process dies."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        server.check_alive()
        with contextlib.suppress(aiohttp.ClientError, OSError):
            async with session.get(url) as response:
                if response.status == 200:
                    return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"{server.name} not ready after {timeout_s:.0f} s:\n{server.log_tail()}")


async def agent_context_length(session: aiohttp.ClientSession, model_id: str) -> int:
    """The context the agent really gave the model (it clamps to the trained context)."""
    async with session.get("http://localhost/v1/models") as response:
        listing = await response.json()
    for entry in listing["data"]:
        if entry["id"] == model_id:
            return int(entry["context_length"])
    raise RuntimeError(f"the agent does not serve {model_id!r}: {listing}")


# --------------------------------------------------------------------------- the schedule


@dataclass(frozen=True)
class Settings:
    model: Path
    prompt: str
    max_tokens: int
    threads: int
    n_ctx: int
    rounds: int
    pause_s: float
    pause_pairs: int
    seed: int


async def run_after_pause(contender: Contender, max_tokens: int, pause_s: float) -> Sample:
    if pause_s > 0:
        await asyncio.sleep(pause_s)
    return await contender.run(max_tokens)


async def warm_up(
    contenders: Sequence[Contender], settings: Settings, progress: harness.Progress
) -> None:
    """One run each: pages the weights in and puts the prompt in every KV cache.

    A first run evaluates the whole prompt as one batch, later ones only its last token; the
    two paths round differently, so a greedy warm-up text may differ from the later ones.
    """
    for contender in contenders:
        sample = await run_after_pause(contender, settings.max_tokens, settings.pause_s)
        progress(f"warm-up {LABELS[contender.key]}: {sample.tokens_per_s:.1f} tok/s")


async def run_rounds(
    contenders: Sequence[Contender],
    settings: Settings,
    rng: random.Random,
    progress: harness.Progress,
) -> dict[str, list[Sample]]:
    """Round-robin, order shuffled every round; sample ``i`` of each list is from round ``i``."""
    samples: dict[str, list[Sample]] = {c.key: [] for c in contenders}
    order = list(contenders)
    for round_no in range(1, settings.rounds + 1):
        rng.shuffle(order)
        for contender in order:
            sample = await run_after_pause(contender, settings.max_tokens, settings.pause_s)
            samples[contender.key].append(sample)
        progress(
            f"round {round_no}/{settings.rounds}: "
            + ", ".join(f"{c.key} {samples[c.key][-1].tokens_per_s:.1f}" for c in contenders)
        )
    return samples


@dataclass(frozen=True)
class PauseEffect:
    """The follower's medians when it starts right after the leader vs after a pause."""

    leader: str
    follower: str
    pairs: int
    pause_s: float
    tokens_per_s_no_pause: float
    tokens_per_s_pause: float
    ttft_ms_no_pause: float
    ttft_ms_pause: float
    #: Cores this process keeps busy in the windows of SPIN_WINDOWS_S after an in-process run.
    spin_cores: tuple[float, float]


#: Back-to-back windows right after a generation ends, in seconds.
SPIN_WINDOWS_S = (0.02, 0.2)


async def cores_busy_after(contender: Contender, settings: Settings) -> tuple[float, float]:
    """Run once, then measure how many cores this process burns in each of SPIN_WINDOWS_S.

    Meaningful for an in-process contender only: its threads are the ones in this process.
    """
    await run_after_pause(contender, settings.max_tokens, settings.pause_s)
    busy = []
    for window in SPIN_WINDOWS_S:
        wall, cpu = time.perf_counter(), time.process_time()
        await asyncio.sleep(window)
        busy.append((time.process_time() - cpu) / (time.perf_counter() - wall))
    return busy[0], busy[1]


async def pause_experiment(
    leader: Contender, follower: Contender, settings: Settings, rng: random.Random
) -> PauseEffect:
    """Run the follower straight after the leader, or ``pause_s`` after it, in shuffled pairs.

    The leader is another process, so any CPU its threads burn after finishing competes with
    the follower's threads, as it would between any two contenders in the main rounds.
    """
    pauses = [0.0, settings.pause_s]
    followers: dict[float, list[Sample]] = {p: [] for p in pauses}
    for _ in range(settings.pause_pairs):
        rng.shuffle(pauses)
        for pause in pauses:
            await run_after_pause(leader, settings.max_tokens, settings.pause_s)
            followers[pause].append(await run_after_pause(follower, settings.max_tokens, pause))
    quiet, busy = followers[settings.pause_s], followers[0.0]
    spins = [await cores_busy_after(follower, settings) for _ in range(settings.pause_pairs)]
    return PauseEffect(
        leader=leader.key,
        follower=follower.key,
        pairs=settings.pause_pairs,
        pause_s=settings.pause_s,
        tokens_per_s_no_pause=statistics.median(s.tokens_per_s for s in busy),
        tokens_per_s_pause=statistics.median(s.tokens_per_s for s in quiet),
        ttft_ms_no_pause=statistics.median(s.ttft_s for s in busy) * 1000,
        ttft_ms_pause=statistics.median(s.ttft_s for s in quiet) * 1000,
        spin_cores=(
            statistics.median(first for first, _ in spins),
            statistics.median(second for _, second in spins),
        ),
    )


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    runs: int
    tokens_per_s: float
    tokens_per_s_p25: float
    tokens_per_s_p75: float
    ttft_ms: float
    ratio_vs_create_completion: float
    ratio_vs_generate: float
    #: Median over rounds of this round's rate over create_completion's in the same round.
    paired_ratio_vs_create_completion: float
    ttft_delta_vs_create_completion_ms: float
    ttft_delta_vs_generate_ms: float


def summarize(samples: dict[str, list[Sample]]) -> list[Row]:
    def tps(key: str) -> list[float]:
        return [s.tokens_per_s for s in samples[key]]

    def ttft_ms(key: str) -> float:
        return statistics.median(s.ttft_s for s in samples[key]) * 1000

    base_tps, raw_tps = statistics.median(tps(COMPLETION)), statistics.median(tps(GENERATE))
    base_ttft, raw_ttft = ttft_ms(COMPLETION), ttft_ms(GENERATE)
    rows = []
    for key in LABELS:
        if key not in samples:
            continue
        rates = tps(key)
        p25, p75 = harness.quartiles(rates)
        median_tps, median_ttft = statistics.median(rates), ttft_ms(key)
        rows.append(
            Row(
                key=key,
                label=LABELS[key],
                runs=len(rates),
                tokens_per_s=median_tps,
                tokens_per_s_p25=p25,
                tokens_per_s_p75=p75,
                ttft_ms=median_ttft,
                ratio_vs_create_completion=median_tps / base_tps,
                ratio_vs_generate=median_tps / raw_tps,
                paired_ratio_vs_create_completion=harness.paired_ratio(rates, tps(COMPLETION)),
                ttft_delta_vs_create_completion_ms=median_ttft - base_ttft,
                ttft_delta_vs_generate_ms=median_ttft - raw_ttft,
            )
        )
    return rows


@dataclass(frozen=True)
class Verdict:
    """The project's budgets, checked for one way of reaching the agent."""

    label: str
    ratio: float
    #: The median of per-round ratios; steadier than ``ratio`` when the machine is busy.
    paired_ratio: float
    ttft_delta_ms: float

    @property
    def tps_met(self) -> bool:
        return self.ratio >= TPS_RATIO_TARGET

    @property
    def ttft_met(self) -> bool:
        return self.ttft_delta_ms <= TTFT_DELTA_TARGET_MS

    def describe(self) -> str:
        if self.tps_met:
            tps_outcome = "met"
        else:
            tps_outcome = f"**missed** by {(TPS_RATIO_TARGET - self.ratio) * 100:.1f} points"
        if self.ttft_met:
            ttft_outcome = "met"
        else:
            ttft_outcome = f"**missed** by {self.ttft_delta_ms - TTFT_DELTA_TARGET_MS:.1f} ms"
        return (
            f"{self.label}: tokens/s {self.ratio:.3f} of in-process "
            f"(target >= {TPS_RATIO_TARGET}): {tps_outcome} "
            f"(median of per-round ratios: {self.paired_ratio:.3f}); "
            f"TTFT {self.ttft_delta_ms:+.1f} ms (target <= +{TTFT_DELTA_TARGET_MS:g} ms): "
            f"{ttft_outcome}."
        )


def verdicts(rows: Sequence[Row]) -> list[Verdict]:
    return [
        Verdict(
            r.label,
            r.ratio_vs_create_completion,
            r.paired_ratio_vs_create_completion,
            r.ttft_delta_vs_create_completion_ms,
        )
        for r in rows
        if r.key in AGENT_KEYS
    ]


@dataclass(frozen=True)
class Environment(harness.Environment):
    llama_cpp_python: str
    python: str


@dataclass(frozen=True)
class Report:
    settings: Settings
    environment: Environment
    rows: list[Row]
    pause: PauseEffect | None
    #: Greedy decoding: every measured run of every contender should produce the same text.
    distinct_texts: int
    #: Contenders with a measured run whose text differs from create_completion's first one.
    odd_texts: list[str]
    #: The command line that produced this report.
    command: str

    def as_json(self) -> dict[str, Any]:
        return {
            "settings": harness.json_fields(self.settings),
            "environment": asdict(self.environment),
            "contenders": {row.key: asdict(row) for row in self.rows},
            "targets": {
                "tokens_per_s_ratio_min": TPS_RATIO_TARGET,
                "ttft_delta_ms_max": TTFT_DELTA_TARGET_MS,
                "results": [
                    {**asdict(v), "tokens_per_s_met": v.tps_met, "ttft_met": v.ttft_met}
                    for v in verdicts(self.rows)
                ],
            },
            "pause_experiment": asdict(self.pause) if self.pause else None,
            "distinct_texts": self.distinct_texts,
            "contenders_with_other_text": self.odd_texts,
            "command": self.command,
        }


# --------------------------------------------------------------------------- output


RICH_HEADINGS = (
    "contender",
    "median\ntok/s",
    "tok/s\np25..p75",
    "ratio vs\ncreate_completion",
    "ratio vs\ngenerate()",
    "median\nTTFT ms",
    "TTFT Δ ms vs\ncreate_completion",
    "TTFT Δ ms vs\ngenerate()",
)


def rich_table(rows: Sequence[Row]) -> Table:
    return harness.rich_table(
        "Streaming through a server vs llama-cpp-python in-process",
        RICH_HEADINGS,
        [table_cells(row) for row in rows],
    )


def table_cells(row: Row) -> list[str]:
    return [
        row.label,
        f"{row.tokens_per_s:.1f}",
        f"{row.tokens_per_s_p25:.0f}..{row.tokens_per_s_p75:.0f}",
        f"{row.ratio_vs_create_completion:.3f}",
        f"{row.ratio_vs_generate:.3f}",
        f"{row.ttft_ms:.1f}",
        f"{row.ttft_delta_vs_create_completion_ms:+.1f}",
        f"{row.ttft_delta_vs_generate_ms:+.1f}",
    ]


MARKDOWN_HEADINGS = (
    "contender",
    "median tokens/s",
    "tokens/s p25..p75",
    "ratio to in-process create_completion",
    "ratio to in-process generate()",
    "median TTFT (ms)",
    "TTFT Δ vs create_completion (ms)",
    "TTFT Δ vs generate() (ms)",
)


def pause_sentence(effect: PauseEffect) -> str:
    rate_change = effect.tokens_per_s_no_pause / effect.tokens_per_s_pause - 1
    first_ms, second_ms = (window * 1000 for window in SPIN_WINDOWS_S)
    return (
        f"Pause experiment ({effect.pairs} pairs, order shuffled): an in-process `generate()` "
        f'run started right after a run of "{LABELS[effect.leader]}" had a median TTFT of '
        f"{effect.ttft_ms_no_pause:.1f} ms and {effect.tokens_per_s_no_pause:.1f} tokens/s; "
        f"started {effect.pause_s:g} s after it, {effect.ttft_ms_pause:.1f} ms and "
        f"{effect.tokens_per_s_pause:.1f} tokens/s. Without the pause: TTFT "
        f"{effect.ttft_ms_no_pause - effect.ttft_ms_pause:+.1f} ms, tokens/s {rate_change:+.1%}. "
        f"Right after an in-process generation ends, its idle threads still keep "
        f"{effect.spin_cores[0]:.2f} cores busy for {first_ms:.0f} ms, then "
        f"{effect.spin_cores[1]:.2f} cores over the next {second_ms:.0f} ms (medians)."
    )


def markdown_section(report: Report) -> str:
    parts = [
        SECTION_BEGIN,
        "## Serving overhead (`bench/serving.py`)",
        "",
        "Streaming `/v1/completions` through the agent (over loopback HTTP and over its Unix "
        "socket) and through `llama_cpp.server`, against llama-cpp-python in the benchmark's own "
        "process: `create_completion(stream=True)` and the raw `generate()` token loop the agent "
        "runs internally. Medians over alternating rounds in one run; ratios are what to read, "
        "absolute numbers depend on the machine and its load. The script's docstring explains "
        "the method.",
        "",
        *run_facts(report),
        "",
        *harness.caution(report.environment),
        harness.markdown_table(MARKDOWN_HEADINGS, [table_cells(r) for r in report.rows]),
        "",
        "TTFT is measured from sending the request to the first non-empty text chunk; tokens/s "
        "is (tokens - 1) / (last token - first token), both on the client side. Every run repeats "
        "the prompt, so the KV cache holds it and TTFT is one decode step plus the serving path. "
        "`llama_cpp.server` is sent `repeat_penalty: 1.0`, since its own default (1.1) would "
        "change the greedy tokens; everything else is its default.",
        "",
        f"Targets (the project's budgets: at least {TPS_RATIO_TARGET:.0%} of in-process "
        "tokens/s, at most "
        f"{TTFT_DELTA_TARGET_MS:g} ms added TTFT; baseline `create_completion`):",
        "",
        *(f"- {v.describe()}" for v in verdicts(report.rows)),
    ]
    if report.pause is not None:
        parts += ["", pause_sentence(report.pause)]
    parts.append(SECTION_END)
    return "\n".join(parts) + "\n"


def run_facts(report: Report) -> list[str]:
    """What ran where, as a Markdown list."""
    s, env = report.settings, report.environment
    return [
        *harness.machine_facts(env),
        f"- Model: `{s.model.name}`, threads {s.threads}, n_ctx {s.n_ctx}",
        f'- Prompt: "{s.prompt}", max_tokens {s.max_tokens}, greedy (temperature 0)',
        f"- Rounds: {s.rounds} (order shuffled each round, after one warm-up run each); "
        f"pause between runs: {s.pause_s:g} s",
        f"- llama-cpp-python {env.llama_cpp_python}, Python {env.python}",
        f"- Distinct texts over all measured runs (greedy, so 1 is expected): "
        f"{report.distinct_texts}",
        f"- This run: `{report.command}`",
        f"- Reproduce: {REPRODUCE}",
    ]


# --------------------------------------------------------------------------- orchestration


def load_in_process(settings: Settings) -> Any:
    return llama_cpp.Llama(
        model_path=str(settings.model),
        n_ctx=settings.n_ctx,
        n_threads=settings.threads,
        n_threads_batch=settings.threads,
        verbose=False,
    )


@dataclass(frozen=True)
class Servers:
    agent: harness.ServerProcess
    agent_socket: Path
    agent_port: int
    llama_server: harness.ServerProcess
    llama_server_port: int


async def benchmark(
    settings: Settings, servers: Servers, llm: Any, progress: harness.Progress
) -> tuple[dict[str, list[Sample]], PauseEffect | None]:
    model_id = settings.model.name.removesuffix(".gguf")
    # The name the agent gives the file when it imports it (lower case, cleaned up).
    agent_model_id = name_from_filename(settings.model)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    unix = aiohttp.UnixConnector(path=str(servers.agent_socket))
    async with (
        aiohttp.ClientSession(timeout=timeout) as agent_http,
        aiohttp.ClientSession(connector=unix, timeout=timeout) as agent_unix,
        aiohttp.ClientSession(timeout=timeout) as llama_http,
    ):
        await wait_ready(servers.agent, agent_unix, "http://localhost/readyz", READY_TIMEOUT_S)
        llama_base = f"http://127.0.0.1:{servers.llama_server_port}"
        await wait_ready(
            servers.llama_server, llama_http, f"{llama_base}/v1/models", READY_TIMEOUT_S
        )
        served_ctx = await agent_context_length(agent_unix, agent_model_id)
        if served_ctx != settings.n_ctx:
            raise RuntimeError(
                f"the agent serves the model with context {served_ctx}, not {settings.n_ctx}; "
                f"pass --n-ctx {served_ctx} so every contender uses the same"
            )
        progress("servers ready")
        agent_url = f"http://127.0.0.1:{servers.agent_port}/v1/completions"
        prompt = settings.prompt
        contenders: list[Contender] = [
            InProcessCompletion(llm, prompt),
            InProcessGenerate(llm, prompt),
            StreamingClient(AGENT_HTTP, agent_http, agent_url, agent_model_id, prompt, AGENT_EXTRA),
            StreamingClient(
                AGENT_UNIX, agent_unix, AGENT_UNIX_URL, agent_model_id, prompt, AGENT_EXTRA
            ),
            StreamingClient(
                LLAMA_SERVER,
                llama_http,
                f"{llama_base}/v1/completions",
                model_id,
                prompt,
                LLAMA_SERVER_EXTRA,
            ),
        ]
        rng = random.Random(settings.seed)
        await warm_up(contenders, settings, progress)
        samples = await run_rounds(contenders, settings, rng, progress)
        effect = None
        if settings.pause_pairs > 0 and settings.pause_s > 0:
            progress("pause experiment")
            effect = await pause_experiment(contenders[3], contenders[1], settings, rng)
        return samples, effect


@contextlib.contextmanager
def started_servers(settings: Settings, workdir: Path) -> Iterator[Servers]:
    """Start the agent and llama_cpp.server; stop both on the way out, whatever happens."""
    with contextlib.ExitStack() as stack:
        agent, sock, agent_port = start_agent(
            settings.model, workdir, threads=settings.threads, n_ctx=settings.n_ctx
        )
        stack.callback(agent.stop)
        llama_server, llama_port = start_llama_server(
            settings.model, workdir, threads=settings.threads, n_ctx=settings.n_ctx
        )
        stack.callback(llama_server.stop)
        yield Servers(agent, sock, agent_port, llama_server, llama_port)


def odd_texts(samples: dict[str, list[Sample]]) -> list[str]:
    reference = samples[COMPLETION][0].text
    return [key for key, runs in samples.items() if any(s.text != reference for s in runs)]


def measure(settings: Settings, command: str, progress: harness.Progress) -> Report:
    start = harness.RunStart.now()
    with (
        harness.temp_dir("edgelm-bench-", short=True) as workdir,
        started_servers(settings, workdir) as servers,
    ):
        llm = load_in_process(settings)  # loads while the servers load theirs
        try:
            samples, effect = asyncio.run(benchmark(settings, servers, llm, progress))
        finally:
            llm.close()
    return Report(
        settings=settings,
        environment=Environment.measured(
            start,
            llama_cpp_python=str(llama_cpp.__version__),
            python=harness.python_version(),
        ),
        command=command,
        rows=summarize(samples),
        pause=effect,
        distinct_texts=len({s.text for runs in samples.values() for s in runs}),
        odd_texts=odd_texts(samples),
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = harness.argument_parser(
        "Streaming tokens/s and time to first token: the agent (HTTP and Unix "
        "socket) and llama_cpp.server against llama-cpp-python in-process."
    )
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="GGUF model file")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="plain-text prompt")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens per run")
    parser.add_argument("--threads", type=int, default=2, help="generation threads, everywhere")
    parser.add_argument("--n-ctx", type=int, default=4096, help="context size, everywhere")
    parser.add_argument("--rounds", type=int, default=15, help="round-robin rounds")
    parser.add_argument(
        "--pause-s", type=float, default=0.5, help="quiet time before every run, in seconds"
    )
    parser.add_argument(
        "--pause-pairs",
        type=int,
        default=8,
        help="pairs per pause setting in the pause experiment (0, or --pause-s 0, skips it)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for the shuffled order")
    harness.add_output_options(parser, json_help="print the raw medians as JSON on stdout")
    args = parser.parse_args(argv)
    if args.max_tokens < 2 or args.rounds < 1 or args.pause_s < 0:
        parser.error("need --max-tokens >= 2, --rounds >= 1 and --pause-s >= 0")
    if not args.model.is_file():
        parser.error(f"no model at {args.model} (`make model` fetches the default one)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Settings(
        model=args.model.resolve(),
        prompt=args.prompt,
        max_tokens=args.max_tokens,
        threads=args.threads,
        n_ctx=args.n_ctx,
        rounds=args.rounds,
        pause_s=args.pause_s,
        pause_pairs=args.pause_pairs,
        seed=args.seed,
    )
    console, log = harness.start_run(args, width=140)
    try:
        report = measure(settings, harness.this_command(), lambda message: log.log(message))
    except KeyboardInterrupt:
        log.print("interrupted; servers stopped")
        return 130
    except ShortRunError as exc:
        log.print(f"[red]{exc}[/red]")
        return 1
    console.print(rich_table(report.rows))
    for verdict in verdicts(report.rows):
        console.print(verdict.describe().replace("**", ""))
    if report.pause is not None:
        console.print(pause_sentence(report.pause))
    harness.print_caution(console, report.environment)
    if report.distinct_texts != 1:
        console.print(
            f"[yellow]warning: {report.distinct_texts} distinct texts; other than "
            f"create_completion's: {', '.join(report.odd_texts)}[/yellow]"
        )
    harness.publish(args, console, SECTION, report.as_json, lambda: markdown_section(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

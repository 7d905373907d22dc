"""What does holding the output to a grammar cost, in tokens per second?

The agent constrains JSON schemas, ``json_object``, tool calls and GBNF grammars while it
generates: llama.cpp's grammar sampler masks, at every token, each candidate that would leave
the grammar. This script measures that mask's cost on a real model, through the agent's own
backend (``LlamaCppBackend`` and ``run_generation``, the code the API runs), in this process:

* ``free text``: no constraint, the baseline;
* ``json_object``: any JSON object;
* ``json_schema``: a nested schema (strings, an enum, bounded integers, a bounded array);
* ``tool call``: ``tool_choice`` ``required`` with one function;
* ``tools, auto``: ``tool_choice`` ``auto`` where the model answers in text, so the grammar
  follows free text (``[^<] .*``) for the whole reply.

Every contender runs greedy (temperature 0) on the same chat prompt, so each of its runs is
the same generation; rates are ``(tokens - 1) / decode time``, so prompt processing stays out.
The contenders alternate round-robin for ``--rounds`` rounds, in a freshly shuffled order each
round; each contender's rate is compared with the free-text rate of the same round, and the
median of those ratios is reported, which holds steadier than a ratio of medians when the
machine's load changes during the run.

The table is printed and written to ``docs/benchmarks.md`` between
``<!-- structured-output:begin -->`` and ``<!-- structured-output:end -->`` (``--no-write``
only prints; ``--json`` prints the raw medians).
"""

from __future__ import annotations

import os
import random
import statistics
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgelm_agent.generation.structured_output import parse_output_constraint
from edgelm_agent.generation.tool_calls import parse_tool_request, plain_history, tool_constraint
from edgelm_agent.inference.backend import run_generation
from edgelm_agent.inference.chat_template import ChatMessage, ChatTemplate
from edgelm_agent.inference.loader import load_backend
from edgelm_agent.inference.types import (
    Finished,
    GenerationEvent,
    GenerationRequest,
    OutputConstraint,
    SamplingParams,
)

if TYPE_CHECKING or __package__:  # mypy, or `python -m bench.structured_output`
    from bench import harness
else:  # `python bench/structured_output.py` puts this folder on sys.path
    import harness

DEFAULT_MODEL = harness.REPO / "models" / "SmolLM2-135M-Instruct-Q4_1.gguf"
SECTION = "structured-output"
REPRODUCE = "`python bench/structured_output.py --model models/SmolLM2-135M-Instruct-Q4_1.gguf`"
CITY: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "country": {"type": "string", "maxLength": 40},
        "population": {"type": "integer", "minimum": 0},
        "climate": {"enum": ["oceanic", "continental", "mediterranean", "arid"]},
        "landmarks": {
            "type": "array",
            "items": {"type": "string", "maxLength": 40},
            "minItems": 3,
            "maxItems": 8,
        },
    },
    "required": ["city", "country", "population", "climate", "landmarks"],
}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
        },
    },
}
QUESTION = "Describe Paris, its country, population, climate and landmarks."
# json_object holds the output to any object: asked the plain question, greedy SmolLM2 closes
# it at once (`{}`, 2 tokens), which measures nothing. Asking for the keys gives a document.
JSON_QUESTION = (
    "Reply with a JSON object with the keys city, country, population, climate and "
    "landmarks (a list of five) for Paris."
)


@dataclass(frozen=True)
class Contender:
    key: str
    label: str
    messages: tuple[ChatMessage, ...]
    constraint: OutputConstraint | None


def contenders() -> list[Contender]:
    ask = (ChatMessage("user", QUESTION),)
    tools_required = parse_tool_request({"tools": [WEATHER_TOOL], "tool_choice": "required"})
    tools_auto = parse_tool_request({"tools": [WEATHER_TOOL]})
    assert tools_required is not None
    assert tools_auto is not None
    weather = (ChatMessage("user", "What is the weather in Paris?"),)
    schema_format = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY}}
    return [
        Contender("free", "free text", ask, None),
        Contender(
            "json_object",
            "json_object",
            (ChatMessage("user", JSON_QUESTION),),
            parse_output_constraint({"response_format": {"type": "json_object"}}),
        ),
        Contender(
            "json_schema",
            "json_schema (nested)",
            ask,
            parse_output_constraint({"response_format": schema_format}),
        ),
        Contender(
            "tool_call",
            "tool call (required)",
            plain_history(weather, tools_required.offered),
            tool_constraint(tools_required),
        ),
        Contender(
            "tools_auto",
            "tools, auto, text reply",
            plain_history(ask, tools_auto.offered),
            tool_constraint(tools_auto),
        ),
    ]


def run_once(
    backend: Any, prompt: list[int], constraint: OutputConstraint | None, n: int
) -> Finished:
    events: list[GenerationEvent] = []
    params = SamplingParams(max_tokens=n, temperature=0.0, constraint=constraint)
    return run_generation(
        backend, GenerationRequest(tuple(prompt), params), threading.Event(), events.append
    )


def main() -> None:
    parser = harness.argument_parser(__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="a GGUF chat model")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    parser.add_argument("--rounds", type=int, default=15, help="runs of each contender")
    parser.add_argument("--max-tokens", type=int, default=160, help="tokens per run at most")
    harness.add_output_options(parser, json_help="print the medians as JSON on stdout")
    args = parser.parse_args()
    console, progress = harness.start_run(args, width=100)
    backend = load_backend(args.model, threads=args.threads, context_length=2048)
    info = backend.info
    assert info.chat_template is not None, "the benchmark needs a chat model"
    template = ChatTemplate(info.chat_template, bos_token=info.bos_token, eos_token=info.eos_token)
    entries = contenders()
    prompts = {c.key: backend.tokenize(template.render(c.messages)) for c in entries}
    rates: dict[str, list[float]] = {c.key: [] for c in entries}
    tokens: dict[str, int] = {}
    try:
        for c in entries:  # warm-up: the page cache, llama.cpp's buffers, the grammar parse
            run_once(backend, prompts[c.key], c.constraint, args.max_tokens)
        for n in range(args.rounds):
            order = entries[:]
            random.shuffle(order)
            for c in order:
                finished = run_once(backend, prompts[c.key], c.constraint, args.max_tokens)
                assert finished.tokens_per_s is not None, f"{c.label}: one token only"
                rates[c.key].append(finished.tokens_per_s)
                tokens[c.key] = finished.completion_tokens
            progress.print(f"round {n + 1}/{args.rounds}")
    finally:
        backend.close()
    rows = []
    for c in entries:
        median = statistics.median(rates[c.key])
        low, high = harness.quartiles(rates[c.key])
        rows.append(
            [
                c.label,
                str(tokens[c.key]),
                f"{median:.1f}",
                f"{low:.1f} to {high:.1f}",
                f"{harness.paired_ratio(rates[c.key], rates['free']):.1%}",
            ]
        )
    load = harness.load_average()
    headings = ["output", "tokens", "tokens/s (median)", "interquartile", "vs free text"]
    console.print(harness.rich_table("Grammar cost", headings, rows))

    def markdown() -> str:
        begin, end = harness.markers(SECTION)
        return "\n".join(
            [
                begin,
                "## Structured output: the grammar's cost (`bench/structured_output.py`)",
                "",
                f"Model `{args.model.name}`, {args.threads} threads, greedy, {args.rounds} "
                "rounds of every contender in a shuffled order, medians side by side. "
                "`tokens` is how long one run is (a JSON document or a call ends by itself; "
                f"free text stops at {args.max_tokens}).",
                "",
                harness.markdown_table(headings, rows),
                "",
                f"Load average when the run ended: {load[0]:.1f} (1 min), {load[1]:.1f} (5 min) "
                f"on {os.cpu_count()} cores; a busy machine lowers every rate, and the ratio "
                "to free text in the same round is the figure to read.",
                "",
                f"Reproduce with {REPRODUCE}.",
                end,
                "",
            ]
        )

    harness.publish(
        args,
        console,
        SECTION,
        lambda: {c.key: statistics.median(rates[c.key]) for c in entries},
        markdown,
        after="serving",
    )


if __name__ == "__main__":
    main()

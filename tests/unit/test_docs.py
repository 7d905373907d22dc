"""The docs say what the code does: every log event, setting, route, metric and command."""

from __future__ import annotations

import re
from pathlib import Path

import click
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

from edgelm_agent.config import SETTINGS
from edgelm_agent.metrics import AgentMetrics

REPO = Path(__file__).resolve().parents[2]
GUIDE = (REPO / "docs" / "operator-guide.md").read_text()
API = (REPO / "docs" / "api.md").read_text()
ALL_DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

# log.info("name", …), the same spelt over several lines, event("name") for a chosen level,
# emit("name") for a forwarded runtime log, and RateLimitedLog(log, "name", …).
_EMITTED = (
    r'\.(?:debug|info|warning|error|exception)\(\s*"([a-z0-9_]+)"',
    r'\b(?:event|emit)\(\s*"([a-z0-9_]+)"',
    r'RateLimitedLog\(\s*\w+,\s*"([a-z0-9_]+)"',
)


def emitted_events() -> set[str]:
    names: set[str] = set()
    for path in (REPO / "agent" / "edgelm_agent").rglob("*.py"):
        text = path.read_text()
        for pattern in _EMITTED:
            names |= set(re.findall(pattern, text))
    return names


def documented_events() -> set[str]:
    section = GUIDE.split("Every event the agent emits", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([a-z0-9_]+)` \|", section, flags=re.MULTILINE))


class TestOperatorGuide:
    def test_every_log_event_the_agent_emits_is_documented(self):
        """No event reaches the log that the operator guide does not explain."""
        missing = emitted_events() - documented_events()
        assert not missing, f"undocumented log events: {sorted(missing)}"

    def test_every_documented_log_event_is_emitted(self):
        """The guide lists no event the agent never emits."""
        stale = documented_events() - emitted_events()
        assert not stale, f"documented but never emitted: {sorted(stale)}"

    def test_every_setting_is_in_the_settings_table(self):
        """Each setting's TOML key and environment variable are documented."""
        for setting in SETTINGS:
            if setting.key.startswith("test_"):
                continue  # fault injection for the test suite, not an operator's setting
            assert f"| `{setting.key}` | `{setting.env}` |" in GUIDE, setting.key


class TestDocsStandAlone:
    def test_no_doc_cites_files_outside_the_repository(self):
        """The docs stand on their own: no design notes or paths from outside the repo."""
        for path in [REPO / "README.md", *(REPO / "docs").glob("*.md")]:
            text = path.read_text()
            assert "design.md" not in text, path
            assert "../shared" not in text, path
            assert "-spec.md" not in text, path
            assert "edgelm-spec" not in text, path


def code_blocks(text: str) -> list[str]:
    """The fenced code blocks of a Markdown text, backslash continuations joined."""
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)
    return [block.replace("\\\n", " ") for block in blocks]


def generation_examples(text: str) -> list[str]:
    """Every example that asks a model for text: an ``edgelm chat`` or ``jobs submit``
    command, a curl call to a completions endpoint, a request body in JSON, an openai call."""
    found: list[str] = []
    for block in code_blocks(text):
        for line in block.splitlines():
            if re.search(r"edgelm (chat|jobs submit|fleet jobs submit)\b", line) or (
                "curl" in line and "completions" in line
            ):
                found.append(line)
        if re.search(r'^\s*\{\s*"(model|request)"', block, flags=re.MULTILINE) and re.search(
            r'"(messages|prompt)"', block
        ):
            found.append(block)
        if ".create(" in block and "model=" in block:
            found.append(block)
    return found


class TestExamples:
    def test_every_generation_example_sets_max_tokens(self):
        """Every example a reader may copy bounds its reply: ``max_tokens`` or
        ``--max-tokens`` in each command, request body and client call."""
        for path in [REPO / "README.md", *(REPO / "docs").glob("*.md")]:
            for example in generation_examples(path.read_text()):
                assert re.search(r"max[_-]tokens", example), f"{path.name}: {example[:200]}"

    def test_the_examples_are_found(self):
        """The check above looks at the examples there are (a guard against a pattern that
        matches nothing)."""
        guide = generation_examples(GUIDE)
        assert any("jobs submit" in e for e in guide)
        api = generation_examples((REPO / "docs" / "api.md").read_text())
        assert len(api) >= 2


# --- the agent's routes: every one registered is in api.md's table, and only those -------------

_ADD = re.compile(r"\.add_(get|post|put|patch|delete)\(")
_ADD_LITERAL = re.compile(r'\.add_(get|post|put|patch|delete)\(\s*"([^"]+)"')
_ADD_ROUTE = re.compile(r"\.add_route\(")
_ADD_ROUTE_LITERAL = re.compile(r'\.add_route\(\s*"([A-Z]+)",\s*"([^"]+)"')


def _route(method: str, path: str) -> tuple[str, str]:
    """``GET /v1/jobs/{job_id}`` and ``GET /v1/jobs/{id}`` are one route."""
    return method.upper(), re.sub(r"\{[^}]*\}", "{}", path)


def registered_routes() -> set[tuple[str, str]]:
    routes: set[tuple[str, str]] = set()
    for path in sorted((REPO / "agent" / "edgelm_agent" / "api").rglob("*.py")):
        text = path.read_text()
        found = [*_ADD_LITERAL.findall(text), *_ADD_ROUTE_LITERAL.findall(text)]
        calls = len(_ADD.findall(text)) + len(_ADD_ROUTE.findall(text))
        # A path this pattern cannot read would escape the check: make it fail instead.
        assert len(found) == calls, f"{path.name}: a route whose path is not a string literal"
        routes |= {_route(method, route) for method, route in found}
    return routes


def documented_routes() -> set[tuple[str, str]]:
    table = API.split("| method | path | what it does |", 1)[1].split("\n\n", 1)[0]
    rows = re.findall(r"^\| ([A-Z]+) \| `([^`]+)` \|", table, flags=re.MULTILINE)
    return {_route(method, path) for method, path in rows}


class TestApiReference:
    def test_every_route_the_agent_registers_is_documented(self):
        """A route missing from api.md's table is one nobody can find."""
        missing = registered_routes() - documented_routes()
        assert not missing, f"routes not in docs/api.md: {sorted(missing)}"

    def test_every_documented_route_exists(self):
        """api.md's table lists no route the agent does not serve."""
        stale = documented_routes() - registered_routes()
        assert not stale, f"documented but not registered: {sorted(stale)}"

    def test_the_routes_are_found(self):
        """A guard against patterns that match nothing."""
        assert ("GET", "/v1/sync") in registered_routes()
        assert ("DELETE", "/v1/jobs/{}") in registered_routes()
        assert len(documented_routes()) >= 20

    def test_every_route_has_a_section_or_a_row_of_its_own(self):
        """Beyond the summary table, each path is described somewhere further down."""
        body = API.split("| method | path | what it does |", 1)[1].split("\n\n", 1)[1]
        for method, path in registered_routes():
            pattern = re.escape(path).replace(r"\{\}", r"\{[a-z_]*\}")
            assert re.search(pattern + r"(?![a-z/])", body), f"{method} {path}"


# --- metrics: every one AgentMetrics defines is in the guide's table, with its type -------------


def exposed_name(family: Metric) -> str:
    """The name a scrape shows: a counter ``x`` is exposed as ``x_total``."""
    return f"{family.name}_total" if family.type == "counter" else family.name


def defined_metrics() -> dict[str, str]:
    registry = CollectorRegistry()
    AgentMetrics(registry)
    return {exposed_name(family): family.type for family in registry.collect()}


def documented_metrics(doc: str) -> dict[str, str]:
    section = doc.split("\n## Metrics", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(edgelm_[a-z_]+)` \| ([a-z]+) \|", section, flags=re.MULTILINE)
    return dict(rows)


class TestMetricsTable:
    def test_every_metric_is_documented_with_its_type(self):
        """Each metric of edgelm_agent.metrics has a row, under its exposed name."""
        defined, documented = defined_metrics(), documented_metrics(GUIDE)
        missing = sorted(set(defined) - set(documented))
        assert not missing, f"metrics not in the operator guide: {missing}"
        wrong = {n: (documented[n], t) for n, t in defined.items() if documented[n] != t}
        assert not wrong, f"documented type != real type: {wrong}"

    def test_every_documented_metric_exists(self):
        stale = sorted(set(documented_metrics(GUIDE)) - set(defined_metrics()))
        assert not stale, f"documented but not defined: {stale}"

    def test_the_sync_metrics_are_there(self):
        """A guard against a parser that finds nothing."""
        assert {"edgelm_sync_connected", "edgelm_outbox_messages"} <= set(defined_metrics())
        assert "edgelm_requests_total" in documented_metrics(GUIDE)


# --- the CLI: every `edgelm` command is documented somewhere --------------------------------------


def leaf_commands() -> list[str]:
    from edgelm_cli.main import cli

    found: list[str] = []

    def walk(command: click.Command, path: list[str]) -> None:
        if isinstance(command, click.Group):
            ctx = click.Context(command)
            for name in command.list_commands(ctx):
                sub = command.get_command(ctx, name)
                assert sub is not None, name
                walk(sub, [*path, name])
        else:
            found.append(" ".join(path))

    walk(cli, [])
    return found


class TestCommands:
    def test_every_command_is_documented(self):
        """`edgelm X Y` appears in the README or docs/ for every command there is."""
        text = " ".join(" ".join(path.read_text().split()) for path in ALL_DOCS)
        missing = [c for c in leaf_commands() if not re.search(rf"\bedgelm {re.escape(c)}\b", text)]
        assert not missing, f"commands no doc mentions: {missing}"

    def test_the_commands_are_found(self):
        commands = leaf_commands()
        assert {
            "agent run",
            "control run",
            "fleet rollouts pause",
            "provision token create",
        } <= set(commands)


# --- Markdown tables render: each row has the header's cells, none is broken ----------------------


def markdown_tables(text: str) -> list[list[list[str]]]:
    """The tables outside code blocks, as rows of cells (``\\|`` is a pipe inside a cell)."""
    tables: list[list[list[str]]] = []
    rows: list[list[str]] = []
    in_code = False
    for line in [*text.splitlines(), ""]:
        if line.startswith("```"):
            in_code = not in_code
        if not in_code and line.startswith("|"):
            rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
        elif rows:
            tables.append(rows)
            rows = []
    return tables


class TestTables:
    def test_every_row_has_the_header_s_columns(self):
        """A stray ``|`` or a missing cell shifts a row out of its columns."""
        for path in ALL_DOCS:
            for table in markdown_tables(path.read_text()):
                width = len(table[0])
                for row in table:
                    assert len(row) == width, f"{path.name}: {' | '.join(row)[:120]}"

    def test_no_cell_is_empty_or_has_an_open_code_span(self):
        """An empty default or a lone backtick renders as nothing, or swallows the row. (A
        header cell may be empty: a column of verdicts needs no title.)"""
        for path in ALL_DOCS:
            for table in markdown_tables(path.read_text()):
                for row in table[2:]:
                    for cell in row:
                        assert cell, f"{path.name}: empty cell in {' | '.join(row)[:120]}"
                        assert cell.count("`") % 2 == 0, f"{path.name}: {cell[:120]}"

    def test_the_tables_are_found(self):
        assert len(markdown_tables(GUIDE)) >= 5
        assert any(t[0] == ["metric", "type", "labels", "meaning"] for t in markdown_tables(GUIDE))

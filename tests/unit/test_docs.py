"""The docs say what the code does: every log event and every setting, both ways."""

from __future__ import annotations

import re
from pathlib import Path

from edgelm_agent.config import SETTINGS

REPO = Path(__file__).resolve().parents[2]
GUIDE = (REPO / "docs" / "operator-guide.md").read_text()

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

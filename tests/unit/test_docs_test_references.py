"""A doc that says "shown by this test" names a test that exists.

The security page and the guides back each claim with the test that shows it. A test renamed
or deleted would leave the claim standing with nothing behind it, so every reference of the
form ``tests/…/file.py::Class::test_name`` (or ``::test_name``) in the docs must resolve to a
function or method that pytest would collect.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
_REFERENCE = re.compile(r"(tests/[\w/]+\.py)((?:::\w+)+)")


def references() -> list[tuple[str, str, tuple[str, ...]]]:
    """(doc name, test file, names after the file) for every reference in the docs."""
    found = []
    for doc in DOCS:
        for file, names in _REFERENCE.findall(doc.read_text()):
            found.append((doc.name, file, tuple(names.strip(":").split("::"))))
    return found


def defined(tree: ast.Module, names: tuple[str, ...]) -> bool:
    """Whether ``names`` is a test pytest collects there: ``test_x``, ``TestA::test_x``, or a
    whole test class ``TestA`` that holds at least one test."""
    scope: list[ast.stmt] = tree.body
    node: ast.stmt | None = None
    for name in names:
        node = next((n for n in scope if getattr(n, "name", None) == name), None)
        if not isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            return False
        scope = node.body
    if isinstance(node, ast.ClassDef):
        return node.name.startswith("Test") and any(
            isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name.startswith("test")
            for n in node.body
        )
    return names[-1].startswith("test") and all(n.startswith("Test") for n in names[:-1])


class TestDocsTestReferences:
    def test_every_named_test_exists(self):
        """Each test a doc cites is defined where the doc says, under that class and name."""
        missing = []
        for doc, file, names in references():
            path = REPO / file
            if not path.is_file():
                missing.append(f"{doc}: {file} does not exist")
                continue
            if not defined(ast.parse(path.read_text()), names):
                missing.append(f"{doc}: {file}::{'::'.join(names)} is not a test there")
        assert missing == []

    def test_the_references_are_found(self):
        """The pattern finds the security page's references (so the check above checks)."""
        docs = {doc for doc, _, _ in references()}
        assert "security.md" in docs
        assert len(references()) >= 10

    def test_a_wrong_name_is_caught(self):
        """The resolver tells a missing test from a present one."""
        tree = ast.parse("class TestA:\n    def test_b(self): pass\nasync def test_c(): pass\n")
        assert defined(tree, ("TestA", "test_b"))
        assert defined(tree, ("test_c",))
        assert not defined(tree, ("TestA", "test_x"))
        assert not defined(tree, ("TestB", "test_b"))
        assert not defined(tree, ("test_b",))
        assert defined(tree, ("TestA",))
        assert not defined(ast.parse("class TestEmpty:\n    x = 1\n"), ("TestEmpty",))

"""Every error the agent raises on purpose belongs to one tree and answers from one table."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import edgelm_agent
from edgelm_agent.api.errors import HTTP_ERRORS, error_fields, http_status
from edgelm_agent.errors import EdgelmError, NotReady, QueueFull
from edgelm_agent.registry.errors import ExpiredMetadata, InsufficientSpace


def agent_exceptions() -> list[type[BaseException]]:
    found: set[type[BaseException]] = set()
    for module_info in pkgutil.walk_packages(edgelm_agent.__path__, "edgelm_agent."):
        if module_info.name.endswith(("llama_backend", "onnx_backend")):
            continue  # need a runtime installed; they define no errors of their own
        module = importlib.import_module(module_info.name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__ == module.__name__:
                found.add(obj)
    return sorted(found, key=lambda c: c.__qualname__)


# Signals that never leave the function that raises them: not errors callers see.
INTERNAL = {"_GroupLost", "_HeaderUnreadable", "_TemplateRaised", "ServiceReturned"}


class TestOneTree:
    def test_every_public_error_derives_from_edgelm_error(self):
        """No error a caller can meet subclasses bare Exception."""
        strays = [
            c.__qualname__
            for c in agent_exceptions()
            if c.__qualname__ not in INTERNAL and not issubclass(c, EdgelmError)
        ]
        assert strays == []

    def test_every_error_has_a_code(self):
        """Each error says what it is in a machine-readable code."""
        for cls in agent_exceptions():
            if issubclass(cls, EdgelmError):
                assert cls.code, cls.__qualname__

    @pytest.mark.parametrize(
        ("error", "expected"),
        [
            (QueueFull("busy", retry_after_s=1), (429, "rate_limit_error")),
            (NotReady("loading", retry_after_s=1), (503, "server_error")),
            (ExpiredMetadata("old"), (422, "registry_error")),
            (
                InsufficientSpace(needed_bytes=2, available_bytes=1, path="/x"),
                (507, "registry_error"),
            ),
        ],
    )
    def test_a_class_answers_from_its_row_or_its_nearest_base(self, error, expected):
        """The table is looked up along the class's bases, nearest first."""
        assert http_status(error) == expected

    def test_the_table_lists_only_the_agents_errors(self):
        """The table holds EdgelmError classes only."""
        assert all(issubclass(cls, EdgelmError) for cls in HTTP_ERRORS)

    def test_job_errors_read_like_http_errors(self):
        """A job's error object has the code, type and message of the HTTP body."""
        fields = error_fields(QueueFull("busy", retry_after_s=1))
        assert fields == {"code": "queue_full", "type": "rate_limit_error", "message": "busy"}

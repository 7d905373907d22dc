"""What the two HTTP fuzz suites share: schemathesis's settings, the case count, the report.

Each suite fetches its server's live OpenAPI document, narrows the few fields whose valid range
depends on the server's state (which a static document cannot say, such as "a deadline in the
future" or "fits the served model's context"), and hands it to schemathesis with every check:

* ``not_a_server_error``: no 5xx, ever;
* ``status_code_conformance``, ``content_type_conformance``, ``response_schema_conformance``,
  ``response_headers_conformance``: every answer is one the document describes;
* ``positive_data_acceptance`` and ``negative_data_rejection``: a body the document allows is
  not refused with 400, and one it forbids is refused; the two together keep the document and
  the validators from drifting apart. Each suite runs them as two APIs (``mode``): valid
  requests from its document narrowed to what a generator can make valid, invalid ones from
  the document as served;
* ``ignored_auth``, ``missing_required_header``, ``unsupported_method``: the tokens are
  enforced, and a method the document does not list answers 405.

``make test`` runs :data:`DEFAULT_EXAMPLES` examples per operation in the fuzzing phase (plus
the deterministic coverage phase's boundary cases); ``EDGELM_FUZZ_EXAMPLES`` (the MQTT fuzz
suites' variable) runs a campaign of that many, and prints the case counts when it ends.
"""

from __future__ import annotations

import atexit
import copy
import http.client
import json
import os
import sys
from collections import Counter
from typing import Any
from urllib.parse import urlsplit

from schemathesis import Case, Config

CAMPAIGN_EXAMPLES = int(os.environ.get("EDGELM_FUZZ_EXAMPLES", "0"))
DEFAULT_EXAMPLES = 8

CASES_RUN: Counter[str] = Counter()
"""Requests schemathesis generated, by API and operation (each may send probes besides)."""


def count_case(api: str, case: Case[Any]) -> None:
    CASES_RUN[f"{api} {case.operation.label}"] += 1


def _report_cases() -> None:
    for api in sorted({label.split(" ", 1)[0] for label in CASES_RUN}):
        mine = {k: n for k, n in CASES_RUN.items() if k.startswith(api + " ")}
        for label, number in sorted(mine.items()):
            print(f"http fuzz cases: {label}: {number}", file=sys.stderr)
        print(f"http fuzz cases: {api} total: {sum(mine.values())}", file=sys.stderr)


if CAMPAIGN_EXAMPLES:
    atexit.register(_report_cases)


def fuzz_config(
    auth: dict[str, str],
    *,
    checks: dict[str, Any] | None = None,
    mode: str = "all",
    **extra: Any,
) -> Config:
    """schemathesis's settings for one API: a bearer token per security scheme, every check,
    and the number of examples. The server's URL is given with each call: the schema is
    loaded when the test module is, before any server runs. ``mode`` is ``positive`` for a
    document narrowed to valid requests, ``negative`` for the exact one, or ``all``."""
    checks = checks or {}
    seed = os.environ.get("EDGELM_FUZZ_SEED")  # to replay a campaign's failure
    return Config.from_dict(
        {
            **({"seed": int(seed)} if seed else {}),
            "auth": {"openapi": {name: {"bearer": token} for name, token in auth.items()}},
            "generation": {
                "mode": mode,
                "max-examples": CAMPAIGN_EXAMPLES or DEFAULT_EXAMPLES,
                # A lone NUL is text like any other: the server must answer it, not crash.
                "allow-x00": True,
            },
            "phases": {"stateful": {"enabled": False}},
            "checks": {
                # 422 is how both servers refuse a request that is well formed but cannot be
                # done: an idempotency key reused for another job, a path that is not a model.
                "positive_data_acceptance": {
                    "expected-statuses": ["2xx", "401", "403", "404", "409", "422", "429", "5xx"]
                },
                **checks,
            },
            "request-timeout": 60,
            **extra,
        }
    )


def integral_floats_as_ints(value: Any) -> Any:
    """``value`` with every float that is a whole number (``32.0``) made an int.

    JSON Schema counts ``32.0`` as an integer, so schemathesis sends it for integer fields;
    both servers, like OpenAI's API, refuse it there with a 400 that names the field (which
    the docs say). A document cannot express that, so the generated bodies send whole numbers
    as integers, which changes no case from valid to invalid or back.
    """
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [integral_floats_as_ints(v) for v in value]
    if isinstance(value, dict):
        return {k: integral_floats_as_ints(v) for k, v in value.items()}
    return value


def narrowed(document: dict[str, Any], changes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A copy of ``document`` with properties of component schemas replaced:
    ``{"Component.property": schema}``."""
    copied = copy.deepcopy(document)
    schemas = copied["components"]["schemas"]
    for where, schema in changes.items():
        component, prop = where.split(".")
        schemas[component]["properties"][prop] = schema
    return copied


def http_call(
    base_url: str,
    method: str,
    path: str,
    *,
    token: str | None = None,
    body: bytes | None = None,
    content_type: str = "application/json",
) -> tuple[int, dict[str, str], Any]:
    """One request: the status, the headers and the JSON body (``None`` if it is not JSON)."""
    url = urlsplit(base_url)
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=60)
    headers = {"Content-Type": content_type} if body is not None else {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    try:
        conn.request(method, path, body, headers)
        response = conn.getresponse()
        raw = response.read()
    finally:
        conn.close()
    try:
        parsed: Any = json.loads(raw)
    except ValueError:
        parsed = None
    return response.status, dict(response.headers), parsed


def resolved(schema: Any, schemas: dict[str, Any]) -> Any:
    while isinstance(schema, dict) and "$ref" in schema:
        schema = schemas[schema["$ref"].rsplit("/", 1)[1]]
    return schema


def impossible_all_ofs(node: Any, schemas: dict[str, Any]) -> list[Any]:
    """Each allOf of the document with a closed object that lacks a member another of its
    branches names: a value with that member matches the other branch, never the closed one."""
    found = []
    if isinstance(node, dict):
        branches = [resolved(b, schemas) for b in node.get("allOf", [])]
        for branch in branches:
            if not isinstance(branch, dict) or branch.get("additionalProperties") is not False:
                continue
            others = {
                name
                for other in branches
                if other is not branch and isinstance(other, dict)
                for name in [*other.get("properties", {}), *other.get("required", [])]
            }
            if others - set(branch.get("properties", {})):
                found.append(node)
        for value in node.values():
            found += impossible_all_ofs(value, schemas)
    elif isinstance(node, list):
        for value in node:
            found += impossible_all_ofs(value, schemas)
    return found

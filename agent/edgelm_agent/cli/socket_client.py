"""A small client for the agent's Unix-socket API, shared by the device-side commands."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp

from edgelm_cli.diagnostics import DiagnosticError

BASE_URL = "http://localhost"  # the host part is ignored on a Unix socket, but HTTP needs one


class AgentClient:
    def __init__(self, socket_path: Path, *, timeout_s: float = 600) -> None:
        self.socket_path = socket_path
        self._timeout_s = timeout_s
        self._session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=str(socket_path)),
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        )

    async def __aenter__(self) -> AgentClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._session.close()

    def _unreachable(self, exc: Exception) -> DiagnosticError:
        return DiagnosticError(
            "agent-unreachable",
            f"cannot reach the agent at {self.socket_path}",
            context=str(exc),
            hint="is it running (`edgelm agent run`)? pass --socket or set EDGELM_SOCKET",
        )

    async def request_json(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        try:
            async with self._session.request(method, BASE_URL + path, json=body) as response:
                return await _json_or_raise(response)
        except aiohttp.ClientConnectionError as exc:
            raise self._unreachable(exc) from exc
        except TimeoutError as exc:
            raise DiagnosticError("agent-timeout", f"no answer within {self._timeout_s} s") from exc

    async def get_json(self, path: str) -> Any:
        return await self.request_json("GET", path)

    async def post_json(self, path: str, body: dict[str, Any]) -> Any:
        return await self.request_json("POST", path, body)

    async def stream_events(self, path: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """POST with ``stream: true`` and yield each server-sent event's JSON until [DONE].

        A stream that ends without [DONE], or carries an error event, is an error: the answer
        is incomplete and a script must not mistake it for a whole one.
        """
        try:
            async with self._session.post(BASE_URL + path, json={**body, "stream": True}) as resp:
                if resp.status != 200:
                    await _json_or_raise(resp)
                async for raw in resp.content:
                    line = raw.decode().strip()
                    if not line.startswith("data:"):
                        continue
                    data = line.removeprefix("data:").strip()
                    if data == "[DONE]":
                        return
                    event = json.loads(data)
                    if "error" in event:
                        error = event["error"]
                        raise DiagnosticError(
                            f"agent-{error.get('code') or 'error'}",
                            error.get("message", "the agent reported an error"),
                            context="during the streamed answer",
                        )
                    yield event
        except aiohttp.ClientConnectionError as exc:
            raise self._unreachable(exc) from exc
        except TimeoutError as exc:
            raise DiagnosticError(
                "agent-timeout",
                f"no complete answer within {self._timeout_s} s",
                hint="raise --timeout, or lower --max-tokens",
            ) from exc
        raise DiagnosticError(
            "agent-stream-cut",
            "the answer stream ended before it was complete",
            hint="the agent may have stopped; see its log",
        )


async def _json_or_raise(response: aiohttp.ClientResponse) -> Any:
    try:
        body = await response.json(content_type=None)
    except (json.JSONDecodeError, aiohttp.ContentTypeError):
        body = None
    if response.status >= 400:
        error = (body or {}).get("error", {}) if isinstance(body, dict) else {}
        raise DiagnosticError(
            f"agent-{error.get('code') or response.status}",
            error.get("message") or f"the agent answered HTTP {response.status}",
            context=f"HTTP {response.status}",
        )
    return body

"""``edgelm chat``: one question to the local agent, the answer streamed to the terminal."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import click

from edgelm_agent.cli.socket_client import AgentClient
from edgelm_agent.config import env_socket_path
from edgelm_cli.diagnostics import DiagnosticError


async def _pick_model(client: AgentClient, model: str | None) -> str:
    if model:
        return model
    listing = await client.get_json("/v1/models")
    models = [m["id"] for m in listing.get("data", [])]
    if not models:
        raise DiagnosticError(
            "no-model",
            "the agent has no model loaded",
            hint="start it with `edgelm agent run --model PATH`",
        )
    return str(models[0])


async def _chat(
    socket: Path, body: dict[str, Any], model: str | None, as_json: bool, timeout_s: float
) -> None:
    async with AgentClient(socket, timeout_s=timeout_s) as client:
        body["model"] = await _pick_model(client, model)
        if as_json:
            click.echo(json.dumps(await client.post_json("/v1/chat/completions", body), indent=2))
            return
        async for event in client.stream_events("/v1/chat/completions", body):
            for choice in event.get("choices", []):
                text = choice.get("delta", {}).get("content")
                if text:
                    sys.stdout.write(text)
                    sys.stdout.flush()
        sys.stdout.write("\n")


@click.command()
@click.argument("prompt")
@click.option(
    "--socket",
    type=click.Path(path_type=Path),
    help="Agent socket. [default: $EDGELM_SOCKET or /run/edgelm/agent.sock]",
)
@click.option("--model", help="Model id. [default: the agent's active model]")
@click.option("--system", help="System prompt.")
@click.option("--max-tokens", type=click.IntRange(min=1), help="Reply length limit in tokens.")
@click.option("--temperature", type=click.FloatRange(0, 2), help="0 means greedy.")
@click.option("--seed", type=int, help="Sampling seed, for reproducible replies.")
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=1),
    default=600,
    show_default=True,
    help="Seconds to wait for the whole answer.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the whole JSON response, no stream.")
def chat(
    prompt: str,
    socket: Path | None,
    model: str | None,
    system: str | None,
    max_tokens: int | None,
    temperature: float | None,
    seed: int | None,
    timeout_s: float,
    as_json: bool,
) -> None:
    """Send PROMPT to the local agent and stream the reply."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    body: dict[str, Any] = {"messages": messages}
    for key, value in (("max_tokens", max_tokens), ("temperature", temperature), ("seed", seed)):
        if value is not None:
            body[key] = value
    try:
        asyncio.run(_chat(socket or env_socket_path(), body, model, as_json, timeout_s))
    except DiagnosticError as exc:
        exc.as_json = as_json
        raise
    except KeyboardInterrupt:
        sys.stdout.write("\n")

"""``edgelm jobs``: submit, list, show and cancel durable jobs on the local agent."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from edgelm_agent.cli.socket_client import AgentClient
from edgelm_agent.config import env_socket_path
from edgelm_cli.diagnostics import DiagnosticError
from edgelm_cli.groups import SuggestingGroup

console = Console(stderr=True)

#: ``edgelm jobs show`` exits with the job's outcome, so a script can branch on it. (1 is an
#: error reaching or asking the agent; 2 is a usage error, as for every click command.)
EXIT_SUCCEEDED = 0
EXIT_ENDED_WITHOUT_RESULT = 3  # failed, dead, cancelled or expired
EXIT_NOT_FINISHED = 4  # queued or running
_EXIT_BY_STATE = {
    "succeeded": EXIT_SUCCEEDED,
    "queued": EXIT_NOT_FINISHED,
    "running": EXIT_NOT_FINISHED,
}


def _call(
    socket: Path | None, as_json: bool, method: str, path: str, body: dict[str, Any] | None = None
) -> Any:
    async def go() -> Any:
        async with AgentClient(socket or env_socket_path(), timeout_s=120) as client:
            return await client.request_json(method, path, body)

    try:
        return asyncio.run(go())
    except DiagnosticError as exc:
        exc.as_json = as_json
        raise


def _print(data: Any, as_json: bool, human: str) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        console.print(human)


def _socket_and_json(fn: Any) -> Any:
    fn = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")(fn)
    return click.option(
        "--socket",
        type=click.Path(path_type=Path),
        help="Agent socket. [default: $EDGELM_SOCKET or /run/edgelm/agent.sock]",
    )(fn)


@click.group(cls=SuggestingGroup)
def jobs() -> None:
    """Durable generation jobs: they survive crashes, reboots and days offline."""


@jobs.command("submit")
@click.argument("prompt")
@click.option("--model", required=True, help="Model id, as in /v1/models.")
@click.option(
    "--chat/--completion",
    default=True,
    show_default=True,
    help="Send PROMPT as a user message, or as a plain completion prompt.",
)
@click.option("--max-tokens", type=click.IntRange(min=1))
@click.option("--priority", type=click.IntRange(-100, 100), default=0, show_default=True)
@click.option(
    "--ttl",
    "ttl_s",
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds the job may wait before it expires unrun.",
)
@click.option("--idempotency-key", help="Submitting the same key again returns the same job.")
@click.option("--upstream", is_flag=True, help="Also report the result to the control plane.")
@click.option(
    "--wait-for-model",
    is_flag=True,
    help="Accept the job even if its model is not on the device yet; it runs once it is.",
)
@click.option("--metadata", help="JSON object stored with the job and its result.")
@_socket_and_json
def submit_cmd(
    prompt: str,
    model: str,
    chat: bool,
    max_tokens: int | None,
    priority: int,
    ttl_s: float | None,
    idempotency_key: str | None,
    upstream: bool,
    wait_for_model: bool,
    metadata: str | None,
    socket: Path | None,
    as_json: bool,
) -> None:
    """Queue PROMPT as a job; prints its id."""
    request: dict[str, Any] = {"model": model}
    if chat:
        request["messages"] = [{"role": "user", "content": prompt}]
    else:
        request["prompt"] = prompt
    if max_tokens is not None:
        request["max_tokens"] = max_tokens
    body: dict[str, Any] = {
        "request": request,
        "priority": priority,
        "report": "upstream" if upstream else "local",
    }
    if ttl_s is not None:
        body["ttl_s"] = ttl_s
    if wait_for_model:
        body["wait_for_model"] = True
    if idempotency_key:
        body["idempotency_key"] = idempotency_key
    if metadata:
        try:
            body["metadata"] = json.loads(metadata)
        except json.JSONDecodeError as exc:
            raise DiagnosticError(
                "bad-metadata", f"--metadata is not JSON: {exc}", as_json=as_json
            ) from exc
    job = _call(socket, as_json, "POST", "/v1/jobs", body)
    if as_json:
        click.echo(json.dumps(job, indent=2))
        return
    click.echo(job["id"])  # alone on stdout, so that JOB=$(edgelm jobs submit …) works
    # A repeated idempotency key answers with the existing job, which may have left the queue.
    where = f", position {job['position']}" if job.get("position") is not None else ""
    console.print(f"{job['state']}{where}")


@jobs.command("list")
@click.option("--state", help="Only jobs in this state (queued, running, succeeded, …).")
@click.option("--limit", type=click.IntRange(1, 500), default=50, show_default=True)
@click.option("--cursor", help="Continue after this cursor (from the previous page).")
@_socket_and_json
def list_cmd(
    state: str | None, limit: int, cursor: str | None, socket: Path | None, as_json: bool
) -> None:
    """List jobs, oldest first, a page at a time."""
    query = (
        f"?limit={limit}"
        + (f"&state={state}" if state else "")
        + (f"&cursor={cursor}" if cursor else "")
    )
    page = _call(socket, as_json, "GET", "/v1/jobs" + query)
    if as_json:
        click.echo(json.dumps(page, indent=2))
        return
    table = Table("id", "state", "kind", "priority", "attempts")
    for job in page["data"]:
        table.add_row(
            job["id"],
            job["state"],
            job["kind"],
            str(job["priority"]),
            f"{job['attempts']}/{job['max_attempts']}",
        )
    Console().print(table)
    if page["next_cursor"]:
        console.print(f"more: --cursor {page['next_cursor']}")


@jobs.command("show")
@click.argument("job_id")
@_socket_and_json
def show_cmd(job_id: str, socket: Path | None, as_json: bool) -> None:
    """One job: its state, attempts, result or error.

    Exits 0 if the job succeeded, 3 if it ended without a result (failed, dead, cancelled,
    expired), 4 if it is still queued or running, 1 if the agent could not be asked.
    """
    job = _call(socket, as_json, "GET", f"/v1/jobs/{job_id}")
    if as_json:
        click.echo(json.dumps(job, indent=2))
    else:
        console.print(
            f"{job['id']}: {job['state']} (attempt {job['attempts']}/{job['max_attempts']})"
        )
        if job["result"]:
            choice = job["result"]["choices"][0]
            click.echo(choice.get("message", {}).get("content", choice.get("text", "")))
        if job["error"]:
            console.print(f"[red]{job['error']['code']}[/]: {job['error']['message']}")
    raise SystemExit(_EXIT_BY_STATE.get(job["state"], EXIT_ENDED_WITHOUT_RESULT))


@jobs.command("cancel")
@click.argument("job_id")
@_socket_and_json
def cancel_cmd(job_id: str, socket: Path | None, as_json: bool) -> None:
    """Cancel a queued or running job."""
    job = _call(socket, as_json, "DELETE", f"/v1/jobs/{job_id}")
    _print(job, as_json, f"{job['id']} {job['state']}")

"""``edgelm fleet``: the operator's CLI, against the control plane's REST API.

Every command takes ``--control URL`` (else ``$EDGELM_CONTROL_URL``, else ``control_url`` in
``--fleet-dir``'s fleet.toml), ``--token TOKEN`` (else ``$EDGELM_CONTROL_TOKEN``, else
``--fleet-dir``'s ``operator-token``) and ``--json``. Exit statuses: 0 done, 1 error (a
diagnostic; the reference is the control plane's error code when it refused), 2 a malformed
command line; ``rollouts watch`` adds 3 (the rollout failed or was aborted) and 4 (with
``--exit-on-halt``: halted or paused).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from edgelm_cli.groups import SuggestingGroup
from edgelm_provisioning.cli_values import selector_from_options
from edgelm_provisioning.enrollment import checked_device_id, labels_from_cli
from edgelm_provisioning.errors import InvalidValue
from edgelm_provisioning.fleet_models_cmd import models
from edgelm_provisioning.fleet_output import (
    DEVICE_COLUMNS,
    device_detail,
    generic_table,
    job_detail,
    rows_table,
)
from edgelm_provisioning.fleet_rollouts_cmd import rollouts
from edgelm_provisioning.key_rotation_cmd import keys
from edgelm_provisioning.operator_cli import (
    Operator,
    connection_options,
    err_console,
    out_console,
    page_options,
    page_query,
)

TELEMETRY_GROUPS = ("model", "hardware_class")


@click.group(cls=SuggestingGroup)
def fleet() -> None:
    """Manage the fleet through its control plane: devices, models, rollouts, jobs.

    Exit statuses: 0 done, 1 error, 2 malformed command line; `rollouts watch` exits 3 when
    the rollout failed or was aborted (4 with --exit-on-halt when it waits for you).
    """


fleet.add_command(models)
fleet.add_command(rollouts)
fleet.add_command(keys)


# --- devices -----------------------------------------------------------------------------------


@fleet.group("devices", cls=SuggestingGroup)
def devices() -> None:
    """The fleet's devices: presence, labels, what they run."""


@devices.command("list")
@click.option("--label", "labels", multiple=True, metavar="K=V", help="Only devices with these.")
@click.option("--class", "hardware_class", metavar="CLASS", help="Only this hardware class.")
@click.option("--presence", type=click.Choice(["online", "offline"]), help="Only these.")
@page_options
@connection_options
def devices_list_cmd(
    labels: tuple[str, ...],
    hardware_class: str | None,
    presence: str | None,
    limit: int,
    cursor: str | None,
    control: str | None,
    token: str | None,
    fleet_dir: Path | None,
    as_json: bool,
) -> None:
    """Devices, with presence, last seen, agent version and active model."""
    query = page_query(limit, cursor)
    query += [("label", f"{k}={v}") for k, v in labels_from_cli(labels).items()]
    if hardware_class:
        query.append(("class", hardware_class))
    if presence:
        query.append(("presence", presence))
    operator = Operator.connect(control=control, token=token, fleet_dir=fleet_dir, as_json=as_json)
    page = operator.get("/devices", query)

    def human() -> None:
        out_console().print(rows_table(page.get("data", []), DEVICE_COLUMNS))
        if page.get("next_cursor"):
            err_console.print(f"more: --cursor {page['next_cursor']}")

    operator.emit(page, human)


@devices.command("show")
@click.argument("device_id", metavar="ID")
@connection_options
def devices_show_cmd(
    device_id: str, control: str | None, token: str | None, fleet_dir: Path | None, as_json: bool
) -> None:
    """One device: reported state, desired state, recent events and telemetry."""
    device_id = checked_device_id(device_id)
    operator = Operator.connect(control=control, token=token, fleet_dir=fleet_dir, as_json=as_json)
    device = operator.get(f"/devices/{device_id}")
    operator.emit(device, lambda: out_console().print(device_detail(device)))


@devices.command("revoke")
@click.argument("device_id", metavar="ID")
@click.option("--reason", metavar="TEXT", help="Why, for the record (shown with the device).")
@connection_options
def devices_revoke_cmd(
    device_id: str,
    reason: str | None,
    control: str | None,
    token: str | None,
    fleet_dir: Path | None,
    as_json: bool,
) -> None:
    """Revoke device ID in the control plane, for good.

    Everything it sends is refused from now on (`device_revoked`), including what the broker
    queued before; it leaves its rollouts (`revoked`), its remote jobs without a result are
    cancelled, and its retained desired state is deleted. A revoked id never comes back:
    enroll the hardware under a new id. `edgelm provision revoke` runs this after the CRL.
    Running it again changes nothing.
    """
    device_id = checked_device_id(device_id)
    operator = Operator.connect(control=control, token=token, fleet_dir=fleet_dir, as_json=as_json)
    answer = operator.call(lambda client: client.revoke_device(device_id, reason=reason))
    operator.emit(answer, lambda: err_console.print(revocation_summary(answer)))


def revocation_summary(answer: Any) -> str:
    """One line about the control plane's answer to a revocation, for a person."""
    if not isinstance(answer, dict):
        return "the control plane answered the revocation with no details"
    device = answer.get("device", "?")
    if not answer.get("created"):
        return f"{device} was revoked before, at {answer.get('revoked_at')}; nothing changed"
    left = answer.get("rollouts") or []
    cancelled = answer.get("jobs_cancelled") or []
    cleared = "withdrawn" if answer.get("desired_cleared") else "none held"
    return (
        f"revoked {device} in the control plane: everything it sends is refused; "
        f"left {len(left)} rollout(s), {len(cancelled)} remote job(s) cancelled, "
        f"desired state {cleared}"
    )


# --- remote jobs -------------------------------------------------------------------------------


@fleet.group("jobs", cls=SuggestingGroup)
def jobs() -> None:
    """Remote jobs: one prompt run on many devices, durably, with per-device results."""


@jobs.command("submit")
@click.argument("prompt")
@click.option("--model", required=True, help="The model to run it on (name, as devices serve it).")
@click.option("--devices", metavar="A,B", help="These devices, by id.")
@click.option("--label", "labels", multiple=True, metavar="K=V", help="Devices with all labels.")
@click.option("--class", "hardware_class", metavar="CLASS", help="Devices of a hardware class.")
@click.option("--all", "all_devices", is_flag=True, help="Every device of the fleet.")
@click.option(
    "--chat/--completion",
    default=True,
    show_default=True,
    help="Send PROMPT as a user message, or as a plain completion prompt.",
)
@click.option("--max-tokens", type=click.IntRange(min=1))
@click.option("--priority", type=click.IntRange(-100, 100), default=0, show_default=True)
@click.option("--ttl", "ttl_s", type=click.FloatRange(min=0, min_open=True), help="Seconds.")
@click.option("--max-attempts", type=click.IntRange(1, 10), default=3, show_default=True)
@connection_options
def jobs_submit_cmd(
    prompt: str,
    model: str,
    devices: str | None,
    labels: tuple[str, ...],
    hardware_class: str | None,
    all_devices: bool,
    chat: bool,
    max_tokens: int | None,
    priority: int,
    ttl_s: float | None,
    max_attempts: int,
    control: str | None,
    token: str | None,
    fleet_dir: Path | None,
    as_json: bool,
) -> None:
    """Run PROMPT on the devices selected; prints the job's id."""
    selector = selector_from_options(
        devices=devices, labels=labels, hardware_class=hardware_class, all_devices=all_devices
    )
    if not model.strip():
        raise InvalidValue("model", "--model must name a model")
    request: dict[str, Any] = {"model": model}
    if chat:
        request["messages"] = [{"role": "user", "content": prompt}]
    else:
        request["prompt"] = prompt
    if max_tokens is not None:
        request["max_tokens"] = max_tokens
    body: dict[str, Any] = {
        "request": request,
        "selector": selector,
        "priority": priority,
        "max_attempts": max_attempts,
    }
    if ttl_s is not None:
        body["ttl_s"] = ttl_s
    operator = Operator.connect(control=control, token=token, fleet_dir=fleet_dir, as_json=as_json)
    job = operator.post("/jobs", body)
    if as_json:
        operator.emit(job, lambda: None)
        return
    click.echo(job.get("id"))  # alone on stdout: JOB=$(edgelm fleet jobs submit ...)
    entries = job.get("devices")
    count = len(entries) if isinstance(entries, list) else "?"
    err_console.print(
        f"sent to {count} device(s); see it with: edgelm fleet jobs show {job.get('id')}"
    )


@jobs.command("show")
@click.argument("job_id", metavar="ID")
@connection_options
def jobs_show_cmd(
    job_id: str, control: str | None, token: str | None, fleet_dir: Path | None, as_json: bool
) -> None:
    """A remote job: each device's state, and its answer or error."""
    operator = Operator.connect(control=control, token=token, fleet_dir=fleet_dir, as_json=as_json)
    job = operator.get(f"/jobs/{job_id}")
    operator.emit(job, lambda: out_console().print(job_detail(job)))


# --- telemetry ---------------------------------------------------------------------------------


@fleet.command("telemetry")
@click.option("--device", "device_id", metavar="ID", help="One device's telemetry rows.")
@click.option(
    "--group-by",
    metavar="FIELDS",
    help=f"Aggregate by {' and/or '.join(TELEMETRY_GROUPS)}, comma-separated.",
)
@connection_options
def telemetry_cmd(
    device_id: str | None,
    group_by: str | None,
    control: str | None,
    token: str | None,
    fleet_dir: Path | None,
    as_json: bool,
) -> None:
    """Tokens/s, TTFT, errors: per device, or aggregated per model and hardware class."""
    query: list[tuple[str, str]] = []
    if device_id is not None:
        query.append(("device", checked_device_id(device_id)))
    if group_by is not None:
        fields = [f.strip() for f in group_by.split(",") if f.strip()]
        unknown = [f for f in fields if f not in TELEMETRY_GROUPS]
        if not fields or unknown:
            raise InvalidValue(
                "group_by",
                f"--group-by takes {', '.join(TELEMETRY_GROUPS)}, got {group_by!r}",
            )
        query.append(("group_by", ",".join(fields)))
    operator = Operator.connect(control=control, token=token, fleet_dir=fleet_dir, as_json=as_json)
    answer = operator.get("/telemetry", query)

    def human() -> None:
        rows = answer.get("data", []) if isinstance(answer, dict) else []
        if not rows:
            err_console.print("no telemetry yet")
            return
        out_console().print(generic_table([r for r in rows if isinstance(r, dict)]))

    operator.emit(answer, human)

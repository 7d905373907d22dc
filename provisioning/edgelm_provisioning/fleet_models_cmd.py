"""``edgelm fleet models``: publish a model to the fleet's repository, list what is published.

``push`` is the one operator command that needs the offline targets key, so it needs
``--fleet-dir``; the steps and why each is there are in
:mod:`edgelm_provisioning.model_publisher`.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

from edgelm_cli.groups import SuggestingGroup
from edgelm_protocol.errors import TargetRefused
from edgelm_protocol.preset_files import presets_from_document
from edgelm_protocol.targets import GENERATION, MIN_CONTEXT_LENGTH, ROLES
from edgelm_provisioning.errors import InvalidValue, MissingSetting
from edgelm_provisioning.fleet_output import MODEL_COLUMNS, rows_table
from edgelm_provisioning.model_publisher import ModelPublisher, PushPlan
from edgelm_provisioning.model_source import prepare_model
from edgelm_provisioning.operator_cli import (
    Operator,
    connection_options,
    err_console,
    out_console,
    page_options,
    page_query,
)
from edgelm_provisioning.targets_signing import ModelSettings


@click.group(cls=SuggestingGroup)
def models() -> None:
    """Models published in the fleet's signed repository."""


@contextmanager
def _bar(enabled: bool, description: str) -> Iterator[Callable[[int, int], None]]:
    """A progress bar, fed with (bytes done, bytes in all)."""
    progress = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=err_console,
        disable=not enabled,
        transient=True,
    )
    with progress:
        task = progress.add_task(description, total=None)
        yield lambda done, total: progress.update(task, completed=done, total=total)


@models.command("push")
@click.argument("source", metavar="FILE", type=click.Path(path_type=Path, exists=True))
@click.option("--name", required=True, help="Model name (a-z 0-9 . _ -).")
@click.option("--version", "version", required=True, help="Version; never reused for other bytes.")
@click.option(
    "--context-length",
    type=click.IntRange(min=MIN_CONTEXT_LENGTH),
    default=4096,
    show_default=True,
    help="Context window devices serve the model with.",
)
@click.option("--quantization", default="unknown", show_default=True, help="e.g. Q4_1, int4.")
@click.option(
    "--min-ram",
    "min_ram_bytes",
    type=click.IntRange(min=0),
    help="Bytes of RAM a device needs to run it. [default: 1.2 x the model's files]",
)
@click.option(
    "--role",
    type=click.Choice(ROLES),
    default=GENERATION,
    show_default=True,
    help="What the model is for: chat and completions, or /v1/embeddings (a GGUF file).",
)
@click.option(
    "--presets",
    "presets_file",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help="Prompt presets to sign with the model: a .toml or .json file (see docs/fleet.md). "
    "A changed preset is a new --version.",
)
@connection_options
def push_cmd(
    source: Path,
    name: str,
    version: str,
    context_length: int,
    quantization: str,
    min_ram_bytes: int | None,
    role: str,
    presets_file: Path | None,
    control: str | None,
    token: str | None,
    fleet_dir: Path | None,
    as_json: bool,
) -> None:
    """Sign FILE (a GGUF file or an ONNX GenAI folder) as NAME@VERSION and upload it.

    The current targets metadata is fetched and verified against the fleet's root first, the
    new version is signed with DIR/keys/targets-0.pem (which never leaves this machine), and
    the push is confirmed by reading the repository back as a device would.
    """
    if fleet_dir is None:
        raise MissingSetting(
            "fleet_dir",
            "models push needs --fleet-dir: the targets key that signs models is there",
        )
    presets = read_presets_file(presets_file) if presets_file is not None else None
    operator = Operator.connect(control=control, token=token, fleet_dir=fleet_dir, as_json=as_json)
    assert operator.fleet is not None
    publisher = ModelPublisher(operator.fleet, operator.settings.control_url)
    show = not as_json
    if show:
        err_console.print(f"verifying {operator.settings.control_url}/repository ...")
    verified = publisher.verify()
    with _bar(show, "hashing") as hashed:
        prepared = prepare_model(source, hashed)
    settings = ModelSettings(
        name=name,
        version=version,
        context_length=context_length,
        quantization=quantization,
        min_ram_bytes=min_ram_bytes,
        role=role,
        presets=presets,
    )
    plan = publisher.sign(verified, prepared, settings, now=datetime.datetime.now(datetime.UTC))
    if plan.metadata is None:
        _report(operator, plan, None, f"{plan.target.model.ref} is published already")
        return
    upload_bytes = sum(b.length for b in prepared.blobs if b.path is not None)
    with _bar(show, "uploading") as uploaded:
        sent = 0

        def on_bytes(n: int) -> None:
            nonlocal sent
            sent += n
            uploaded(sent, upload_bytes)

        answer = operator.call(lambda client: publisher.upload(client, plan, on_bytes))
    publisher.confirm(plan)
    _report(
        operator,
        plan,
        answer,
        f"published {plan.target.model.ref} (targets v{plan.new_version}, "
        f"sha256 {plan.target.model.sha256[:16]}...)",
    )


def read_presets_file(path: Path) -> dict[str, Any]:
    """A presets file as the signed ``presets`` object; checked before anything is hashed or
    fetched, with the same reader as ``edgelm models import --presets``."""
    try:
        return presets_from_document(path.read_bytes(), suffix=path.suffix)
    except OSError as exc:
        raise InvalidValue("presets", f"cannot read {path}: {exc.strerror}") from exc
    except TargetRefused as exc:
        raise InvalidValue(
            "presets",
            f"{path}: {exc}",
            hint="a presets file has one table per preset name; see 'Prompt presets' in "
            "docs/fleet.md",
        ) from exc


def _report(operator: Operator, plan: PushPlan, answer: Any, line: str) -> None:
    data = {**plan.as_dict(), "control_plane": answer}

    def human() -> None:
        err_console.print(line)
        ref = plan.target.model.ref
        if plan.target.model.role != GENERATION:
            # A rollout makes a model the one that chats; an embedding model is served
            # beside it, as the device's embedding_model setting.
            err_console.print(
                f"  serve it: edgelm models install {ref} on a device, then set "
                f"embedding_model = {ref!r} in its configuration"
            )
            return
        err_console.print(
            f"  roll it out: edgelm fleet rollouts create --model {ref} --all --canary 10%"
        )

    operator.emit(data, human)


@models.command("list")
@page_options
@connection_options
def list_cmd(
    limit: int,
    cursor: str | None,
    control: str | None,
    token: str | None,
    fleet_dir: Path | None,
    as_json: bool,
) -> None:
    """Models the control plane serves (its verified targets)."""
    operator = Operator.connect(control=control, token=token, fleet_dir=fleet_dir, as_json=as_json)
    page = operator.get("/models", page_query(limit, cursor))

    def human() -> None:
        rows = page.get("data", []) if isinstance(page, dict) else []
        out_console().print(rows_table(rows, MODEL_COLUMNS))
        if isinstance(page, dict) and page.get("next_cursor"):
            err_console.print(f"more: --cursor {page['next_cursor']}")

    operator.emit(page, human)

"""``edgelm models``: the device's model registry, through the running agent or on disk.

By default every command talks to the agent over its Unix socket. With ``--state-dir`` it works
on the registry files directly, for an agent that is stopped or will not start; the registry
lock makes sure that never happens beside a running agent. Direct mode cannot load models, so
there ``activate`` verifies the model and records it: the agent loads and health-checks it at
its next start and falls back to the previous model if that fails.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn
from rich.table import Table

from edgelm_agent.api.registry_routes import state_view
from edgelm_agent.cli.socket_client import AgentClient
from edgelm_agent.config import env_socket_path, load_config
from edgelm_agent.errors import ConfigError, EdgelmError
from edgelm_agent.inference.types import MIN_CONTEXT_LENGTH
from edgelm_agent.registry.factory import registry_for
from edgelm_agent.registry.model_target import GENERATION, ROLES
from edgelm_agent.registry.registry import Registry
from edgelm_agent.state_dir import use_private_umask
from edgelm_cli.diagnostics import DiagnosticError
from edgelm_cli.groups import SuggestingGroup
from edgelm_protocol.errors import TargetRefused
from edgelm_protocol.preset_files import presets_from_document

console = Console(stderr=True)


class Where:
    """Where a command runs: the agent's socket, or a state directory on disk."""

    def __init__(self, socket: Path | None, state_dir: Path | None, as_json: bool) -> None:
        self.socket = socket or env_socket_path()
        self.state_dir = state_dir
        self.as_json = as_json

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        async def go() -> Any:
            async with AgentClient(self.socket, timeout_s=3600) as client:
                if method == "GET":
                    return await client.get_json(path)
                return await client.post_json(path, body or {})

        waiting = console.status("waiting for the agent…") if not self.as_json else _nothing()
        try:
            with waiting:
                return asyncio.run(go())
        except DiagnosticError as exc:
            exc.as_json = self.as_json
            raise

    @contextmanager
    def registry(self, *, create: bool = False) -> Iterator[Registry]:
        """The registry under ``--state-dir``. Only commands that add a model (``create``) may
        start a new one: a mistyped path must not pass for an empty registry."""
        assert self.state_dir is not None
        root = self.state_dir / "registry"
        if not create and not root.is_dir():
            raise DiagnosticError(
                "state-dir-has-no-registry",
                f"{self.state_dir} holds no model registry",
                context=f"{root} does not exist",
                hint="check the path (an agent's --state-dir); `edgelm models import` or "
                "`install` with --state-dir creates a registry there",
                as_json=self.as_json,
            )
        use_private_umask()
        try:
            config = load_config(None, {"state_dir": str(self.state_dir)})
        except ConfigError as exc:
            raise DiagnosticError("config-invalid", str(exc), as_json=self.as_json) from exc
        registry = registry_for(config)
        try:
            with registry.locked():
                yield registry
        except EdgelmError as exc:
            raise DiagnosticError(f"registry-{exc.code}", str(exc), as_json=self.as_json) from exc

    def progress(self) -> _Bars:
        return _Bars(enabled=not self.as_json)


@contextmanager
def _nothing() -> Iterator[None]:
    yield


class _Bars:
    """rich progress bars fed by the registry's (phase, done, total) callbacks."""

    def __init__(self, *, enabled: bool) -> None:
        self._progress = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=console,
            disable=not enabled,
        )
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> Callable[[str, int, int], None]:
        self._progress.__enter__()
        return self.update

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(None, None, None)

    def update(self, phase: str, done: int, total: int) -> None:
        if phase not in self._tasks:
            self._tasks[phase] = self._progress.add_task(phase, total=total)
        self._progress.update(self._tasks[phase], completed=done, total=total)


def _emit(where: Where, data: Any, human: Callable[[], None]) -> None:
    if where.as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        human()


def _split(ref: str) -> tuple[str, str | None]:
    name, _, version = ref.partition("@")
    return name, version or None


def _options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")(fn)
    fn = click.option(
        "--state-dir",
        type=click.Path(path_type=Path, file_okay=False),
        help="Work on this state directory directly (agent stopped).",
    )(fn)
    return click.option(
        "--socket",
        type=click.Path(path_type=Path),
        help="Agent socket. [default: $EDGELM_SOCKET or /run/edgelm/agent.sock]",
    )(fn)


@click.group(cls=SuggestingGroup)
def models() -> None:
    """The device's signed model registry."""


@models.command("list")
@_options
def list_cmd(socket: Path | None, state_dir: Path | None, as_json: bool) -> None:
    """Installed models: which is active, previous and pinned."""
    where = Where(socket, state_dir, as_json)
    if state_dir is not None:
        with where.registry() as registry:
            view = state_view(registry.state())
    else:
        view = where.call("GET", "/v1/registry/models")

    def table() -> None:
        t = Table("model", "format", "size", "state")
        for m in view["models"]:
            flags = [f for f in ("active", "previous", "pinned") if m[f]]
            t.add_row(m["ref"], m["format"], f"{m['length'] / 1e6:.1f} MB", ", ".join(flags))
        Console().print(t)

    _emit(where, view, table)


@models.command("import")
@click.argument("path", type=click.Path(path_type=Path, exists=True))
@click.option("--name", help="Model name. [default: from the file name]")
@click.option(
    "--version",
    help="Version. [default: sha256-<first 12 hex digits>, then -p<8 of the presets'> if any]",
)
@click.option(
    "--context-length",
    type=click.IntRange(min=MIN_CONTEXT_LENGTH),
    default=4096,
    show_default=True,
    help="Context window the model is served with (capped at what it was trained on).",
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
    help="Prompt presets to sign with the model: a .toml or .json file (see the operator "
    "guide). A changed preset is a new version.",
)
@_options
def import_cmd(
    path: Path,
    name: str | None,
    version: str | None,
    context_length: int,
    role: str,
    presets_file: Path | None,
    socket: Path | None,
    state_dir: Path | None,
    as_json: bool,
) -> None:
    """Sign a GGUF file or ONNX GenAI folder into this device's repository and install it."""
    where = Where(socket, state_dir, as_json)
    presets = read_presets_file(presets_file, as_json) if presets_file is not None else None
    if state_dir is not None:
        with where.registry(create=True) as registry, where.progress() as progress:
            target = registry.import_model(
                path,
                name=name,
                version=version,
                context_length=context_length,
                progress=progress,
                role=role,
                presets=presets,
            )
        data = target.as_dict()
    else:
        data = where.call(
            "POST",
            "/v1/registry/import",
            {
                # absolute, not resolved: a link stays a link, which the agent refuses to read
                "path": str(path.absolute()),
                "name": name,
                "version": version,
                "context_length": context_length,
                "role": role,
                "presets": presets,
            },
        )
    _emit(
        where,
        data,
        lambda: console.print(
            f"imported [bold]{data['name']}@{data['version']}[/] (sha256 {data['sha256'][:16]}…)"
            + (" as an embedding model" if data.get("role") == "embedding" else "")
        ),
    )


def read_presets_file(path: Path, as_json: bool) -> dict[str, Any]:
    """A presets file as the signed ``presets`` object, or a CLI error that says what is
    wrong in it and where (the same reader as ``edgelm fleet models push --presets``)."""
    try:
        return presets_from_document(path.read_bytes(), suffix=path.suffix)
    except OSError as exc:
        raise DiagnosticError(
            "presets-unreadable", f"cannot read {path}: {exc.strerror}", as_json=as_json
        ) from exc
    except TargetRefused as exc:
        raise DiagnosticError(
            "presets-invalid",
            str(exc),
            context=f"in {path}",
            hint="a presets file has one table per preset name; see 'Prompt presets' in the "
            "operator guide",
            as_json=as_json,
        ) from exc


@models.command("install")
@click.argument("ref")
@_options
def install_cmd(ref: str, socket: Path | None, state_dir: Path | None, as_json: bool) -> None:
    """Download and verify NAME[@VERSION] from the fleet repository (newest if no version)."""
    where = Where(socket, state_dir, as_json)
    name, version = _split(ref)
    if state_dir is not None:
        with where.registry(create=True) as registry, where.progress() as progress:
            if registry.standalone:
                raise DiagnosticError(
                    "direct-install",
                    "this device has no fleet repository to install from",
                    hint="enroll it (`edgelm agent enroll`), set repository_mirrors, or "
                    "use `edgelm models import` for a local file",
                    as_json=as_json,
                )
            data = registry.install(name, version, progress).as_dict()
    else:
        data = where.call("POST", "/v1/registry/install", {"name": name, "version": version})
    _emit(
        where, data, lambda: console.print(f"installed [bold]{data['name']}@{data['version']}[/]")
    )


@models.command("activate")
@click.argument("ref")
@_options
def activate_cmd(ref: str, socket: Path | None, state_dir: Path | None, as_json: bool) -> None:
    """Verify, load and health-check NAME[@VERSION], then switch to it."""
    where = Where(socket, state_dir, as_json)
    if state_dir is not None:
        with where.registry() as registry, where.progress() as progress:
            target = registry.find(ref)
            registry.verified_path(target, progress)
            registry.save(registry.state().activated(target.ref))
        data = target.as_dict()
    else:
        data = where.call("POST", "/v1/registry/activate", {"model": ref})
    _emit(where, data, lambda: console.print(f"active: [bold]{data['name']}@{data['version']}[/]"))


@models.command("rollback")
@_options
def rollback_cmd(socket: Path | None, state_dir: Path | None, as_json: bool) -> None:
    """Switch back to the previous model."""
    where = Where(socket, state_dir, as_json)
    if state_dir is not None:
        with where.registry() as registry:
            state = registry.state()
            if state.previous is None:
                raise DiagnosticError("no-previous", "there is no previous model", as_json=as_json)
            target = registry.find(state.previous)
            registry.verified_path(target)
            registry.save(state.rolled_back(target.ref, "requested"))
        data = target.as_dict()
    else:
        data = where.call("POST", "/v1/registry/rollback")
    _emit(
        where,
        data,
        lambda: console.print(f"rolled back to [bold]{data['name']}@{data['version']}[/]"),
    )


@models.command("verify")
@click.argument("ref", required=False)
@_options
def verify_cmd(ref: str | None, socket: Path | None, state_dir: Path | None, as_json: bool) -> None:
    """Re-hash installed models against their signed metadata."""
    where = Where(socket, state_dir, as_json)
    if state_dir is not None:
        with where.registry() as registry, where.progress() as progress:
            results = [asdict(r) for r in registry.verify(ref, progress)]
        data: dict[str, Any] = {"ok": all(r["ok"] for r in results), "results": results}
    else:
        data = where.call("POST", "/v1/registry/verify", {"model": ref} if ref else {})

    def human() -> None:
        for r in data["results"]:
            mark = "[green]ok[/]" if r["ok"] else f"[red]FAILED[/] {r['error']}"
            console.print(f"{r['ref']}: {mark}")

    _emit(where, data, human)
    if not data["ok"]:
        raise SystemExit(1)


@models.command("gc")
@_options
def gc_cmd(socket: Path | None, state_dir: Path | None, as_json: bool) -> None:
    """Remove models other than the active, previous and pinned ones."""
    where = Where(socket, state_dir, as_json)
    if state_dir is not None:
        with where.registry() as registry:
            removed, freed = registry.gc()
        data: dict[str, Any] = {"removed": removed, "freed_bytes": freed}
    else:
        data = where.call("POST", "/v1/registry/gc")
    _emit(
        where,
        data,
        lambda: console.print(
            f"removed {len(data['removed'])} model(s), freed {data['freed_bytes'] / 1e6:.1f} MB"
        ),
    )


@models.command("pin")
@click.argument("ref")
@click.option("--unpin", is_flag=True, help="Remove the pin instead.")
@_options
def pin_cmd(
    ref: str, unpin: bool, socket: Path | None, state_dir: Path | None, as_json: bool
) -> None:
    """Keep NAME@VERSION through gc (or stop keeping it, with --unpin)."""
    where = Where(socket, state_dir, as_json)
    if state_dir is not None:
        with where.registry() as registry:
            data = {**registry.pin(ref, not unpin).as_dict(), "pinned": not unpin}
    else:
        data = where.call("POST", "/v1/registry/pin", {"model": ref, "pinned": not unpin})
    _emit(
        where,
        data,
        lambda: console.print(
            f"{'unpinned' if unpin else 'pinned'} {data['name']}@{data['version']}"
        ),
    )

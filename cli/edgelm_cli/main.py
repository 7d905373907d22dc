"""Root of the ``edgelm`` command. Groups are imported only when used, so ``edgelm chat`` on a
device never imports the control plane, and a missing extra gives a clear message."""

from __future__ import annotations

import importlib

import click

from edgelm_agent import __version__
from edgelm_cli.diagnostics import DiagnosticError
from edgelm_cli.groups import SuggestingGroup

# name -> (module, attribute, one-line help shown in `edgelm --help`)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "agent": ("edgelm_agent.cli.agent_cmd", "agent", "Run the on-device agent."),
    "chat": ("edgelm_agent.cli.chat_cmd", "chat", "Chat with the local agent over its socket."),
    "models": ("edgelm_agent.cli.models_cmd", "models", "The device's signed model registry."),
    "jobs": ("edgelm_agent.cli.jobs_cmd", "jobs", "Durable jobs on the local agent."),
    "control": ("edgelm_control.cli", "control", "Run the fleet's control plane (server)."),
    "fleet": ("edgelm_provisioning.fleet_cmd", "fleet", "Manage the fleet (operator)."),
    "provision": (
        "edgelm_provisioning.provision_cmd",
        "provision",
        "Fleet keys and device enrollment bundles (operator).",
    ),
}

# The extra that provides a group's third-party packages, for the hint when one is missing.
EXTRAS: dict[str, str] = {"control": "control", "fleet": "control", "provision": "control"}


class LazyGroup(SuggestingGroup):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module_name, attribute, _ = COMMANDS[cmd_name]
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # Only a missing third-party package is an extra that is not installed; a broken
            # import inside edgelm itself is a bug and keeps its traceback.
            if exc.name is None or exc.name.split(".")[0].startswith("edgelm"):
                raise
            extra = EXTRAS.get(cmd_name)
            raise DiagnosticError(
                "command-unavailable",
                f"`edgelm {cmd_name}` cannot run here: the package {exc.name!r} is not installed",
                hint=f"pip install 'edgelm[{extra}]'" if extra else "reinstall edgelm",
            ) from exc
        command = getattr(module, attribute)
        assert isinstance(command, click.Command)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup)
@click.version_option(__version__, prog_name="edgelm")
def cli() -> None:
    """edgelm: run small language models on edge devices, offline first."""


def main() -> None:
    cli()

"""CLI errors in the shape of pip's DiagnosticPipError: what failed, the context, a hint."""

from __future__ import annotations

import json
from typing import IO, Any

import click


class DiagnosticError(click.ClickException):
    """An error a person can act on. ``reference`` is a stable id scripts can match on."""

    exit_code = 1

    def __init__(
        self,
        reference: str,
        message: str,
        *,
        context: str | None = None,
        hint: str | None = None,
        as_json: bool = False,
    ) -> None:
        super().__init__(message)
        self.reference = reference
        self.context = context
        self.hint = hint
        self.as_json = as_json

    def as_dict(self) -> dict[str, Any]:
        return {
            "error": {
                "reference": self.reference,
                "message": self.message,
                "context": self.context,
                "hint": self.hint,
            }
        }

    def show(self, file: IO[Any] | None = None) -> None:
        if self.as_json:
            click.echo(json.dumps(self.as_dict()), file=file)
            return
        click.secho(f"error: {self.message}", fg="red", bold=True, err=True, file=file)
        if self.context:
            click.echo(f"  {self.context}", err=True, file=file)
        if self.hint:
            click.secho(f"hint: {self.hint}", fg="yellow", err=True, file=file)
        click.echo(f"  ({self.reference})", err=True, file=file)

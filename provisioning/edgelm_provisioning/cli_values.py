"""Values typed on the ``edgelm fleet`` command line: selectors, durations and model refs.

What click itself can check (a number, a choice, options given together) fails as a usage
error, exit status 2. What needs the fleet's rules (a device id, a label) raises
:class:`InvalidValue`, shown as a diagnostic with exit status 1 (and as JSON with ``--json``).
The control plane checks everything again; checking here first only makes the message come
sooner and say which option is wrong.
"""

from __future__ import annotations

import re
from typing import Any

import click

from edgelm_protocol.errors import InvalidId
from edgelm_protocol.ids import check_model_key
from edgelm_provisioning.enrollment import checked_device_id, labels_from_cli
from edgelm_provisioning.errors import InvalidValue

_DURATION = re.compile(r"([0-9]+)\s*([smhd]?)")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
HARDWARE_CLASS_MAX_CHARS = 64


def parse_duration_s(text: str) -> int:
    """``90``, ``90s``, ``30m``, ``2h`` or ``7d`` as whole seconds, at least 1."""
    match = _DURATION.fullmatch(text.strip().lower())
    if match is None:
        raise ValueError(f"a duration is a whole number with s, m, h or d, got {text!r}")
    seconds = int(match.group(1)) * _UNIT_S[match.group(2)]
    if seconds < 1:
        raise ValueError(f"a duration must be at least 1 s, got {text!r}")
    return seconds


class Duration(click.ParamType[int]):
    name = "DURATION"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_duration_s(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class Share(click.ParamType[float]):
    """A share from 0 to 1, as ``0.2`` or ``20%``."""

    name = "SHARE"

    def __init__(self, *, below_one: bool = False) -> None:
        self.below_one = below_one

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        text = str(value).strip()
        try:
            share = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            self.fail(f"a share is a number from 0 to 1 or a percentage, got {text!r}", param, ctx)
        top_ok = share < 1 if self.below_one else share <= 1
        if share < 0 or not top_ok:
            upper = "below 1" if self.below_one else "at most 1"
            self.fail(f"a share must be from 0 and {upper}, got {text!r}", param, ctx)
        return share


def check_model_ref(ref: str) -> str:
    """``name@version`` as a rollout names a model."""
    try:
        return check_model_key(ref)
    except InvalidId as exc:
        raise InvalidValue(
            "model",
            f"{exc}",
            hint="name the model as NAME@VERSION (see `edgelm fleet models list`)",
        ) from exc


def selector_from_options(
    *,
    devices: str | None,
    labels: tuple[str, ...],
    hardware_class: str | None,
    all_devices: bool,
) -> dict[str, Any]:
    """Exactly one of ``--devices A,B``, ``--label K=V ...``, ``--class C``, ``--all``."""
    given = [
        name
        for name, present in (
            ("--devices", devices is not None),
            ("--label", bool(labels)),
            ("--class", hardware_class is not None),
            ("--all", all_devices),
        )
        if present
    ]
    if len(given) != 1:
        got = ", ".join(given) if given else "none"
        raise click.UsageError(f"give exactly one of --devices, --label, --class, --all; got {got}")
    if devices is not None:
        ids = [part.strip() for part in devices.split(",") if part.strip()]
        if not ids:
            raise InvalidValue("devices", "--devices needs at least one device id")
        return {"devices": sorted({checked_device_id(i) for i in ids})}
    if labels:
        return {"labels": labels_from_cli(labels)}
    if hardware_class is not None:
        if not 1 <= len(hardware_class) <= HARDWARE_CLASS_MAX_CHARS or _CONTROL_CHARS.search(
            hardware_class
        ):
            raise InvalidValue(
                "class",
                f"a hardware class is 1-{HARDWARE_CLASS_MAX_CHARS} characters without control "
                f"characters, got {hardware_class!r}",
            )
        return {"class": hardware_class}
    return {"all": True}

"""Which devices a rollout targets: frozen, validated selectors and their matching rule.

Four kinds, stored with the rollout as JSON and typed on the CLI as options::

    {"devices": ["kiosk-1", "kiosk-2"]}       --devices kiosk-1,kiosk-2
    {"labels": {"site": "berlin"}}            --label site=berlin [--label k=v ...]  (all match)
    {"class": "pi5"}                          --class pi5
    {"all": true}                             --all

The same :meth:`matches` decides at creation (:func:`select_devices`) and for a device
enrolled later (a late joiner), so the two can never disagree.

A selector accepts exactly what a device can report in its ``state`` message, no less (or some
devices could never be selected) and no more (or a typo could never match): device ids and
label keys use the fleet's id syntax ``[A-Za-z0-9][A-Za-z0-9._-]{0,63}`` (and ``control`` is
no device); label values are text of 0-256 characters and hardware classes of 1-64, without
control characters. These restate :mod:`edgelm_protocol`'s rules, which are the source.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

from edgelm_control.rollouts.errors import EmptySelection, InvalidSelector

ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
ID_SYNTAX = "1-64 of A-Z a-z 0-9 . _ - (not starting with . _ -)"
RESERVED_ID = "control"  # the sender of every control-plane message, never a device
LABEL_VALUE_MAX_CHARS = 256
HARDWARE_CLASS_MAX_CHARS = 64
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")  # controls, lone surrogates
KINDS = ("devices", "labels", "class", "all")


class DeviceFacts(Protocol):
    """What a selector looks at; the store's device rows satisfy it as they are."""

    @property
    def device_id(self) -> str: ...

    @property
    def labels(self) -> Mapping[str, str]: ...

    @property
    def hardware_class(self) -> str | None: ...  # None until the device reported its state


@dataclass(frozen=True)
class Device:
    """A plain :class:`DeviceFacts`, for callers that have no row of their own."""

    device_id: str
    labels: Mapping[str, str]
    hardware_class: str | None


def _checked_id(value: object, *, what: str, param: str) -> str:
    if not isinstance(value, str) or not ID_RE.fullmatch(value):
        raise InvalidSelector(
            f"{what} must be {ID_SYNTAX}, got {value!r}", param=param, value=value
        )
    return value


def _checked_device_id(value: object) -> str:
    if value == RESERVED_ID:
        raise InvalidSelector(
            f"a device id must not be the reserved {RESERVED_ID!r}", param="devices", value=value
        )
    return _checked_id(value, what="a device id", param="devices")


def _checked_text(value: object, *, what: str, param: str, min_chars: int, max_chars: int) -> str:
    if (
        not isinstance(value, str)
        or not min_chars <= len(value) <= max_chars
        or _UNPRINTABLE.search(value)
    ):
        raise InvalidSelector(
            f"{what} must be text of {min_chars}-{max_chars} characters without control "
            f"characters, got {value!r}",
            param=param,
            value=value,
        )
    return value


@dataclass(frozen=True)
class ByDevices:
    """The devices named, by id (sorted, without repeats)."""

    kind: ClassVar[str] = "devices"
    device_ids: tuple[str, ...]

    def __post_init__(self) -> None:
        given: object = self.device_ids  # typed a tuple, but JSON and callers may hand a str
        if isinstance(given, str):  # tuple("kiosk") would be five one-letter ids
            raise InvalidSelector(
                f"devices must be a sequence of ids, got the string {self.device_ids!r}",
                param="devices",
                value=self.device_ids,
            )
        ids = tuple(self.device_ids)
        if not ids:
            raise InvalidSelector(
                "devices must name at least one device", param="devices", value=[]
            )
        for device_id in ids:
            _checked_device_id(device_id)
        object.__setattr__(self, "device_ids", tuple(sorted(set(ids))))

    def matches(self, device: DeviceFacts) -> bool:
        return device.device_id in self.device_ids

    def to_json(self) -> dict[str, object]:
        return {"devices": list(self.device_ids)}

    def describe(self) -> str:
        return f"--devices {','.join(self.device_ids)}"


@dataclass(frozen=True)
class ByLabels:
    """The devices whose labels include every pair given (sorted by key)."""

    kind: ClassVar[str] = "labels"
    labels: tuple[tuple[str, str], ...]

    def __post_init__(self) -> None:
        pairs = tuple(self.labels)
        if not pairs:
            raise InvalidSelector(
                "labels must give at least one key=value (use --all for every device)",
                param="labels",
                value={},
            )
        seen: dict[str, str] = {}
        for key, value in pairs:
            _checked_id(key, what="a label key", param="labels")
            _checked_text(
                value,
                what=f"the value of label {key}",
                param="labels",
                min_chars=0,
                max_chars=LABEL_VALUE_MAX_CHARS,
            )
            if key in seen and seen[key] != value:  # both can never hold at once
                raise InvalidSelector(
                    f"label {key} given twice, as {seen[key]!r} and {value!r}",
                    param="labels",
                    value=key,
                )
            seen[key] = value
        object.__setattr__(self, "labels", tuple(sorted(seen.items())))

    @classmethod
    def of(cls, labels: Mapping[str, str]) -> ByLabels:
        return cls(tuple(labels.items()))

    def matches(self, device: DeviceFacts) -> bool:
        return all(device.labels.get(key) == value for key, value in self.labels)

    def to_json(self) -> dict[str, object]:
        return {"labels": dict(self.labels)}

    def describe(self) -> str:
        return " ".join(f"--label {shlex.quote(f'{key}={value}')}" for key, value in self.labels)


@dataclass(frozen=True)
class ByClass:
    """The devices of one hardware class (as they report it in their state)."""

    kind: ClassVar[str] = "class"
    hardware_class: str

    def __post_init__(self) -> None:
        _checked_text(
            self.hardware_class,
            what="a hardware class",
            param="class",
            min_chars=1,
            max_chars=HARDWARE_CLASS_MAX_CHARS,
        )

    def matches(self, device: DeviceFacts) -> bool:
        return device.hardware_class == self.hardware_class

    def to_json(self) -> dict[str, object]:
        return {"class": self.hardware_class}

    def describe(self) -> str:
        return f"--class {shlex.quote(self.hardware_class)}"


@dataclass(frozen=True)
class AllDevices:
    """Every device of the fleet."""

    kind: ClassVar[str] = "all"

    def matches(self, device: DeviceFacts) -> bool:
        return True

    def to_json(self) -> dict[str, object]:
        return {"all": True}

    def describe(self) -> str:
        return "--all"


Selector = ByDevices | ByLabels | ByClass | AllDevices


def select_devices(selector: Selector, devices: Iterable[DeviceFacts]) -> tuple[str, ...]:
    """The ids of the devices ``selector`` matches, sorted; :class:`EmptySelection` if none.

    A rollout that selects nothing is refused rather than created empty: it is nearly always a
    typo (``--label site=berln``), and it would otherwise complete at once and quietly wait for
    late joiners that never come.
    """
    pool = list(devices)
    chosen = sorted({d.device_id for d in pool if selector.matches(d)})
    if not chosen:
        raise EmptySelection(selector, len(pool))
    return tuple(chosen)


def selector_from_json(data: object) -> Selector:
    """Read a stored or posted selector: an object with exactly one of the four kinds."""
    if not isinstance(data, dict) or len(data) != 1:
        keys = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise InvalidSelector(
            f"selector must be an object with exactly one of {', '.join(KINDS)}, got {keys}",
            param="selector",
            value=data,
        )
    ((kind, value),) = data.items()
    if kind == "devices":
        if not isinstance(value, list):
            raise InvalidSelector(
                f"devices must be a list of device ids, got {value!r}", param="devices", value=value
            )
        return ByDevices(tuple(value))
    if kind == "labels":
        if not isinstance(value, dict):
            raise InvalidSelector(
                f"labels must be an object of key: value, got {value!r}",
                param="labels",
                value=value,
            )
        return ByLabels(tuple(value.items()))
    if kind == "class":
        return ByClass(value)
    if kind == "all":
        if value is not True:
            raise InvalidSelector(f"all must be true, got {value!r}", param="all", value=value)
        return AllDevices()
    raise InvalidSelector(
        f"selector must be one of {', '.join(KINDS)}, got {kind!r}", param="selector", value=data
    )


def selector_from_cli(
    *,
    devices: str | None = None,
    labels: Sequence[str] = (),
    hardware_class: str | None = None,
    all_devices: bool = False,
) -> Selector:
    """Read ``--devices a,b``, ``--label k=v`` (repeatable), ``--class c`` or ``--all``.

    Exactly one kind must be given; repeated ``--label`` options must all match.
    """
    given = [
        option
        for option, present in (
            ("--devices", devices is not None),
            ("--label", bool(labels)),
            ("--class", hardware_class is not None),
            ("--all", all_devices),
        )
        if present
    ]
    if len(given) != 1:
        got = " and ".join(given) if given else "none"
        raise InvalidSelector(
            f"give exactly one of --devices, --label, --class, --all; got {got}",
            param="selector",
            value=given,
        )
    if devices is not None:
        ids = [part.strip() for part in devices.split(",")]
        if any(not part for part in ids):
            raise InvalidSelector(
                f"--devices takes ids separated by commas, without empty ones; got {devices!r}",
                param="--devices",
                value=devices,
            )
        return _with_param("--devices", lambda: ByDevices(tuple(ids)))
    if labels:
        pairs: list[tuple[str, str]] = []
        for text in labels:
            key, sep, value = text.partition("=")
            if not sep:
                raise InvalidSelector(
                    f"--label takes key=value, got {text!r}", param="--label", value=text
                )
            pairs.append((key, value))  # as typed: a label value may hold spaces
        return _with_param("--label", lambda: ByLabels(tuple(pairs)))
    if hardware_class is not None:
        name = hardware_class  # as typed: a class may hold spaces ("Raspberry Pi 5")
        return _with_param("--class", lambda: ByClass(name))
    return AllDevices()


def _with_param(option: str, build: Callable[[], Selector]) -> Selector:
    # The value objects name their JSON field; on the CLI the operator typed an option.
    try:
        return build()
    except InvalidSelector as exc:
        raise InvalidSelector(str(exc), param=option, value=exc.value) from None

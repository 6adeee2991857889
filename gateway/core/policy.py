"""What the cloud may make a device do: one pure decision per command, deny by default.

A command (a direct method, a cloud-to-device message or a twin's desired property) arrives
decoded (:mod:`gateway.control.commands`) as a :class:`Command`. :func:`decide` weighs it
against the gateway's switches, the device's :class:`DevicePolicy` (from its config) and what
the device did lately (its recent writes, its state), and says allowed, or refused with the rule
that refused it and the answer status the caller gets. Nothing here does I/O or keeps a clock:
the control room's shell holds the state and passes it in.

Rules are named the way an operator finds them in the config (``control.enabled``,
``devices.control.writes``): a refusal says where to look.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Channel = Literal["method", "c2d", "twin"]
Action = Literal["write", "read", "status"]
CHANNELS: tuple[Channel, ...] = ("method", "c2d", "twin")

# Answer statuses (docs/commands.md): the HTTP meanings IoT Hub's direct methods borrow.
OK = 200
BAD_REQUEST = 400
FORBIDDEN = 403
NOT_FOUND = 404
CONFLICT = 409  # the device is quarantined or down: the command cannot be carried out now
DEVICE_FAILED = 502  # the device answered, and refused or failed the write
TIMEOUT = 504


@dataclass(frozen=True, slots=True)
class Command:
    """One decoded request for one device."""

    device_id: str
    channel: Channel
    action: Action
    point: str | None = None  # write
    value: Any = None  # write
    points: tuple[str, ...] = ()  # read; empty: every point
    ref: str = ""  # the request's own id: method $rid, C2D message id, twin $version


@dataclass(frozen=True, slots=True)
class WriteRule:
    """One point the cloud may write, within ``low``..``high`` when given."""

    low: float | None = None
    high: float | None = None


@dataclass(frozen=True, slots=True)
class DevicePolicy:
    """A device's allow-list. The default allows no writes at all."""

    writes: Mapping[str, WriteRule] = field(default_factory=dict)
    channels: frozenset[Channel] = frozenset()
    per_minute: int = 0  # writes in any 60 s; 0: none
    # Fresh reads in any 60 s: each is a request on the device's link, served before the
    # next poll, so a flood of them would crowd out telemetry.
    reads_per_minute: int = 60


@dataclass(frozen=True, slots=True)
class Switches:
    """The gateway-wide ones: ``control.enabled`` (the kill switch), ``control.read_only``."""

    enabled: bool = True
    read_only: bool = False


@dataclass(frozen=True, slots=True)
class DeviceState:
    """What the shell knows of the device when the command arrives."""

    known_points: frozenset[str]
    state: str = "up"  # adapters.base: up, down, starting, quarantined
    # Monotonic times of this device's writes and reads tried (any channel), oldest first.
    recent_writes: Sequence[float] = ()
    recent_reads: Sequence[float] = ()


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    status: int = OK
    rule: str = ""
    reason: str = ""


ALLOWED = Decision(True)
RATE_WINDOW = 60.0


def _refuse(status: int, rule: str, reason: str) -> Decision:
    return Decision(False, status, rule, reason)


def decide(
    command: Command,
    policy: DevicePolicy,
    switches: Switches,
    device: DeviceState,
    now: float,
) -> Decision:
    """Allowed, or the first rule (in the order below) that refuses ``command``."""
    if not switches.enabled:
        return _refuse(FORBIDDEN, "control.enabled", "cloud commands are switched off")
    if command.action == "status":
        return ALLOWED
    names = (command.point,) if command.action == "write" else command.points
    unknown = [n for n in names if n is not None and n not in device.known_points]
    if unknown:
        return _refuse(NOT_FOUND, "points", f"{command.device_id} has no point {unknown[0]!r}")
    if command.action == "write":
        refused = _write_refused(command, policy, switches, device, now)
        if refused is not None:
            return refused
    else:
        recent = sum(1 for t in device.recent_reads if now - t < RATE_WINDOW)
        if recent >= policy.reads_per_minute:
            return _refuse(
                FORBIDDEN,
                "devices.control.max_reads_per_minute",
                f"{command.device_id} took {recent} reads in the last minute (at most "
                f"{policy.reads_per_minute})",
            )
    if device.state == "quarantined":
        return _refuse(CONFLICT, "device.quarantined", f"{command.device_id} is quarantined")
    if device.state != "up":
        return _refuse(CONFLICT, "device.state", f"{command.device_id} is {device.state}")
    return ALLOWED


def _write_refused(
    command: Command,
    policy: DevicePolicy,
    switches: Switches,
    device: DeviceState,
    now: float,
) -> Decision | None:
    if switches.read_only:
        return _refuse(FORBIDDEN, "control.read_only", "the gateway takes no writes")
    if command.channel not in policy.channels:
        allowed = ", ".join(sorted(policy.channels)) or "none"
        return _refuse(
            FORBIDDEN,
            "devices.control.channels",
            f"{command.channel} may not write to {command.device_id} (channels allowed: {allowed})",
        )
    point = command.point
    assert point is not None
    rule = policy.writes.get(point)
    if rule is None:
        return _refuse(
            FORBIDDEN, "devices.control.writes", f"{point} is not in {command.device_id}'s writes"
        )
    value = command.value
    number = _number(value)
    if number is None:
        if rule.low is not None or rule.high is not None:
            return _refuse(
                BAD_REQUEST, f"devices.control.writes.{point}", f"{value!r} is not a number"
            )
    else:
        if rule.low is not None and number < rule.low:
            return _refuse(
                FORBIDDEN, f"devices.control.writes.{point}.min", f"{number} is below {rule.low}"
            )
        if rule.high is not None and number > rule.high:
            return _refuse(
                FORBIDDEN, f"devices.control.writes.{point}.max", f"{number} is above {rule.high}"
            )
    recent = [t for t in device.recent_writes if now - t < RATE_WINDOW]
    if len(recent) >= policy.per_minute:
        return _refuse(
            FORBIDDEN,
            "devices.control.max_writes_per_minute",
            f"{command.device_id} took {len(recent)} writes in the last minute (at most "
            f"{policy.per_minute})",
        )
    return None


def _number(value: Any) -> float | None:
    """A JSON number as a float (None for anything else: bools, strings, objects, nan)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None

"""Cloud requests as values: a direct method, a C2D message or a twin's desired points, decoded
into :class:`~gateway.core.policy.Command` or refused with the answer the caller gets.

Pure: bytes and dicts in, commands or answers out. Nothing here trusts the payload: a body that
is not JSON, a wrong type, an unknown key, a request larger than IoT Hub itself would carry, is
a 400 naming what is wrong; a method fieldgate does not offer is a 404. The contract, with
examples that a test runs, is ``docs/commands.md``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gateway.core import codec, iothub
from gateway.core.policy import BAD_REQUEST, NOT_FOUND, Channel, Command

METHODS = ("write", "read", "status")
# A point name as a device table has it (adapters' NAME_PATTERN allows at most 64).
MAX_POINT_NAME = 64
MAX_READ_POINTS = 256


@dataclass(frozen=True, slots=True)
class Answer:
    """What a request is answered with: an HTTP-like status and a JSON body."""

    status: int
    body: Mapping[str, Any]

    def payload(self) -> bytes:
        return codec.dumps(self.body)


def error(status: int, message: str, **fields: Any) -> Answer:
    return Answer(status, {"error": message, **fields})


class Refused(Exception):
    """A request that cannot be decoded; ``answer`` says why."""

    def __init__(self, answer: Answer) -> None:
        super().__init__(answer.body.get("error", ""))
        self.answer = answer


def _bad(message: str) -> Refused:
    return Refused(error(BAD_REQUEST, message))


def _json(payload: bytes, limit: int, what: str) -> Any:
    if len(payload) > limit:
        raise _bad(f"{what} is {len(payload)} bytes; IoT Hub carries at most {limit}")
    if not payload.strip():
        return None
    try:
        return codec.loads(payload)
    except codec.JSONDecodeError as err:
        raise _bad(f"{what} is not JSON: {err}") from None


def _object(value: Any, what: str, keys: tuple[str, ...]) -> dict[str, Any]:
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise _bad(f"{what} must be a JSON object, not {type(value).__name__}")
    extra = sorted(set(value) - set(keys))
    if extra:
        raise _bad(f"{what}: unknown key {extra[0]!r} (known: {', '.join(keys)})")
    return value


def _point_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_POINT_NAME:
        raise _bad(f"{what} must be a point name (a string of 1 to {MAX_POINT_NAME} characters)")
    return value


def _write_value(value: Any, what: str) -> bool | int | float:
    # Written to a register or a characteristic: a number or a bool, nothing else.
    if isinstance(value, bool | int):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    raise _bad(f"{what} must be a number or true/false, not {type(value).__name__}")


def _write(device_id: str, channel: Channel, body: dict[str, Any], ref: str, what: str) -> Command:
    if "point" not in body or "value" not in body:
        raise _bad(f'{what} needs "point" and "value"')
    return Command(
        device_id,
        channel,
        "write",
        point=_point_name(body["point"], f"{what}.point"),
        value=_write_value(body["value"], f"{what}.value"),
        ref=ref,
    )


def decode_method(device_id: str, name: str, payload: bytes, rid: str) -> Command:
    """A direct method call. Raises :class:`Refused` (400, 404)."""
    if name not in METHODS:
        raise Refused(error(NOT_FOUND, f"no method {name[:64]!r}; methods: {', '.join(METHODS)}"))
    data = _json(payload, iothub.METHOD_PAYLOAD_MAX, "the payload")
    if name == "write":
        return _write(
            device_id, "method", _object(data, "the payload", ("point", "value")), rid, "payload"
        )
    if name == "read":
        body = _object(data, "the payload", ("points",))
        points = body.get("points", [])
        if not isinstance(points, list) or len(points) > MAX_READ_POINTS:
            raise _bad(f"payload.points must be a list of at most {MAX_READ_POINTS} point names")
        names = tuple(_point_name(p, f"payload.points[{i}]") for i, p in enumerate(points))
        return Command(device_id, "method", "read", points=names, ref=rid)
    _object(data, "the payload", ())
    return Command(device_id, "method", "status", ref=rid)


def decode_c2d(device_id: str, payload: bytes, message_id: str) -> Command:
    """A cloud-to-device message: the body is a write request, as the ``write`` method's."""
    data = _json(payload, iothub.C2D_PAYLOAD_MAX, "the message")
    return _write(
        device_id, "c2d", _object(data, "the message", ("point", "value")), message_id, "message"
    )


@dataclass(frozen=True, slots=True)
class Desired:
    """A twin's desired points: the commands to carry out and the ones refused while decoding
    (point name -> answer), for the reported side."""

    version: int
    commands: tuple[Command, ...]
    refused: Mapping[str, Answer]


def decode_desired(device_id: str, desired: Any, version: int | None = None) -> Desired:
    """The ``points`` section of a twin's desired properties (the whole document at a twin
    GET, or a patch). Other desired sections are not fieldgate's and are left alone; a point
    set to null (its desired value removed) asks for nothing."""
    if not isinstance(desired, dict):
        return Desired(version or 0, (), {"": error(BAD_REQUEST, "desired is not an object")})
    if version is None:
        raw = desired.get("$version")
        version = raw if isinstance(raw, int) and not isinstance(raw, bool) else 0
    ref = str(version)
    points = desired.get("points")
    if points is None:
        return Desired(version, (), {})
    if not isinstance(points, dict):
        return Desired(version, (), {"": error(BAD_REQUEST, "desired.points must be an object")})
    commands: list[Command] = []
    refused: dict[str, Answer] = {}
    for name, value in points.items():
        if value is None or name.startswith("$"):
            continue
        try:
            _point_name(name, "desired.points key")
            commands.append(
                Command(
                    device_id,
                    "twin",
                    "write",
                    point=name,
                    value=_write_value(value, f"desired.points.{name}"),
                    ref=ref,
                )
            )
        except Refused as err:
            refused[name[:MAX_POINT_NAME]] = err.answer
    return Desired(version, tuple(commands), refused)

"""The small error tree every room raises from.

Library exceptions are translated at the room's boundary and kept as ``__cause__``
(:func:`map_exceptions`). Each error knows the exit code it ends the ``fieldgate`` command with:
:data:`EXIT_FAILED` (1, failed while running) unless it is a refusal before anything started,
:data:`EXIT_REFUSED` (2: a bad config, identity, key or PKI).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import ClassVar, Literal

EXIT_FAILED = 1
EXIT_REFUSED = 2


class FieldgateError(Exception):
    """Base of every error fieldgate raises on purpose."""

    exit_code: ClassVar[int] = EXIT_FAILED


class StartupError(FieldgateError):
    """The gateway cannot start with this config and these files."""

    exit_code = EXIT_REFUSED


class ConfigError(FieldgateError):
    """A config file was refused. ``problems`` holds one line per bad field."""

    exit_code = EXIT_REFUSED

    def __init__(self, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"{path}: invalid config\n{lines}")


# Why a device could not be read. ``reason`` says it in words for the log; ``cause`` is what
# health, metrics and events count by.
DeviceCause = Literal[
    "refused",  # nothing listens, or the connection was refused
    "timeout",  # no answer in time
    "lost",  # the link dropped
    "exception",  # the device answered a Modbus exception
    "malformed",  # the device's answer broke the protocol
    "radio",  # the BLE stack (BlueZ) failed an operation
    "internal",  # a bug of fieldgate's own, reported instead of crashing the device's task
    "unavailable",  # anything else
]


class DeviceUnavailable(FieldgateError):
    def __init__(
        self, device_id: str, endpoint: str, reason: str, *, cause: DeviceCause = "unavailable"
    ) -> None:
        self.device_id = device_id
        self.endpoint = endpoint
        self.reason = reason
        self.cause: DeviceCause = cause
        super().__init__(f"device {device_id} at {endpoint} unavailable: {reason}")


class DeviceRefused(FieldgateError):
    """The auth gate did not admit a device."""

    def __init__(self, device_id: str, reason: str) -> None:
        self.device_id = device_id
        self.reason = reason
        super().__init__(f"device {device_id} refused: {reason}")


class EnvelopeError(FieldgateError):
    """An envelope could not be opened: tampered, moved, unknown key or malformed."""


class KeyringError(FieldgateError):
    exit_code = EXIT_REFUSED


class PkiError(FieldgateError):
    exit_code = EXIT_REFUSED


# Why a hub connection failed. The first group is the hub (or something posing as it) being
# refused or refusing us: security events, and a retry soon cannot fix them. The second group
# is the network or the hub being away: retried at the short backoff, no security event.
UplinkCause = Literal[
    "untrusted",  # the server's chain does not lead to our CA (rogue CA, self-signed)
    "expired",
    "not-yet-valid",
    "hostname",  # the certificate names another host
    "eku",  # the certificate is not for TLS servers (wrong extended key usage)
    "protocol",  # no TLS version in common (a server of TLS 1.1 or older)
    "handshake",  # any other TLS refusal: no common cipher, closed during the handshake
    "refused-connack",  # the broker said no in its CONNACK (not authorized, bad identity)
    "unavailable",  # CONNACK 3: the server is unavailable for now
    "unreachable",
    "timeout",
    "lost",
]
REFUSAL_CAUSES: frozenset[UplinkCause] = frozenset(
    [
        "untrusted",
        "expired",
        "not-yet-valid",
        "hostname",
        "eku",
        "protocol",
        "handshake",
        "refused-connack",
    ]
)


class UplinkError(FieldgateError):
    """The hub connection failed, for ``cause``; ``connack`` is the broker's refusal code.

    ``retryable`` is False for what a retry soon cannot fix (every refusal): the session then
    waits its longest backoff before it tries again.
    """

    def __init__(
        self,
        message: str,
        *,
        retryable: bool | None = None,
        cause: UplinkCause = "lost",
        connack: int | None = None,
    ) -> None:
        self.cause: UplinkCause = cause
        self.connack = connack
        self.retryable = cause not in REFUSAL_CAUSES if retryable is None else retryable
        super().__init__(message)

    @property
    def refusal(self) -> bool:
        """A security refusal (a bad server certificate, TLS, CONNACK), not a network fault."""
        return self.cause in REFUSAL_CAUSES


@contextlib.contextmanager
def map_exceptions(
    mapping: dict[
        type[BaseException] | tuple[type[BaseException], ...],
        Callable[[BaseException], FieldgateError],
    ],
) -> Iterator[None]:
    """Translate a library's exceptions at a room's boundary, keeping each as ``__cause__``::

        with map_exceptions({TimeoutError: lambda e: DeviceUnavailable(..., cause="timeout")}):
            await client.read(...)

    The first matching entry wins (dicts keep their order); anything else passes through.
    """
    try:
        yield
    except Exception as err:
        for kinds, make in mapping.items():
            if isinstance(err, kinds):
                raise make(err) from err
        raise

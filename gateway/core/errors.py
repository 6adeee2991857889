"""The small error tree every room raises from.

Library exceptions are translated at the room's boundary and kept as ``__cause__``.
"""

from __future__ import annotations

from typing import Literal


class FieldgateError(Exception):
    """Base of every error fieldgate raises on purpose."""


class ConfigError(FieldgateError):
    """A config file was refused. ``problems`` holds one line per bad field."""

    def __init__(self, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"{path}: invalid config\n{lines}")


class DeviceUnavailable(FieldgateError):
    def __init__(self, device_id: str, endpoint: str, reason: str) -> None:
        self.device_id = device_id
        self.endpoint = endpoint
        self.reason = reason
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
    pass


class PkiError(FieldgateError):
    pass


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

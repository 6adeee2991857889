"""The small error tree every room raises from.

Library exceptions are translated at the room's boundary and kept as ``__cause__``.
"""

from __future__ import annotations


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


class UplinkError(FieldgateError):
    """The hub connection failed. ``retryable`` is False for what a retry cannot fix."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        self.retryable = retryable
        super().__init__(message)

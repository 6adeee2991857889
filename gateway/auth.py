"""The auth gate: only devices the registry knows, bound where the registry says, pass.

For now the registry is the validated config. A device is admitted when it is known, enabled,
and observed at the endpoint it is bound to; whatever it reported as its fingerprint must match
what the registry expects. Anything else is refused with a reason, recorded as a security event,
and the device stays quarantined: none of its readings pass :meth:`AuthGate.admitted`.
"""

from __future__ import annotations

from dataclasses import dataclass

from adapters.base import Evidence
from gateway.events import SecurityEvents

UNKNOWN_LIMIT = 1000


@dataclass(frozen=True, slots=True)
class Registration:
    device_id: str
    transport: str
    endpoint: str
    enabled: bool = True
    fingerprint: tuple[tuple[str, str], ...] = ()


class AuthGate:
    def __init__(self, registry: list[Registration], events: SecurityEvents) -> None:
        self._registry = {r.device_id: r for r in registry}
        self._events = events
        self._admitted: set[str] = set()
        self.quarantined: dict[str, str] = {}
        self._unknown: set[tuple[str, str]] = set()

    def admitted(self, device_id: str) -> bool:
        return device_id in self._admitted

    def admit(self, evidence: Evidence) -> str | None:
        """None if the device may send, else the reason it is refused (and quarantined)."""
        reason = self._check(evidence)
        device_id = evidence.device_id
        if reason is None:
            if device_id not in self._admitted:
                self._admitted.add(device_id)
                self._events.record(
                    "device-admitted",
                    device_id,
                    "registry match",
                    endpoint=evidence.endpoint,
                    transport=evidence.transport,
                    **evidence.fingerprint,
                )
            return None
        self._admitted.discard(device_id)
        self.quarantined[device_id] = reason
        self._events.record(
            "device-quarantined",
            device_id,
            reason,
            endpoint=evidence.endpoint,
            transport=evidence.transport,
            **evidence.fingerprint,
        )
        return reason

    def unknown(self, transport: str, endpoint: str, seen: str) -> None:
        """A device outside the registry showed itself: one event per endpoint and run, and at
        most ``UNKNOWN_LIMIT`` of them, so that a busy radio cannot flood the record."""
        key = (transport, endpoint)
        if key in self._unknown or len(self._unknown) > UNKNOWN_LIMIT:
            return
        self._unknown.add(key)
        if len(self._unknown) > UNKNOWN_LIMIT:
            reason = f"more than {UNKNOWN_LIMIT} unknown devices; no further ones are recorded"
            self._events.record("device-unknown", None, reason, transport=transport)
            return
        self._events.record(
            "device-unknown",
            None,
            f"not in the registry: {seen}",
            endpoint=endpoint,
            transport=transport,
        )

    def _check(self, evidence: Evidence) -> str | None:
        entry = self._registry.get(evidence.device_id)
        if entry is None:
            return "not in the registry"
        if not entry.enabled:
            return "disabled in the registry"
        if entry.transport != evidence.transport:
            return f"registered for {entry.transport}, seen on {evidence.transport}"
        if entry.endpoint != evidence.endpoint:
            return f"bound to {entry.endpoint}, seen at {evidence.endpoint}"
        for key, expected in entry.fingerprint:
            seen = evidence.fingerprint.get(key)
            if seen != expected:
                return f"fingerprint {key}: expected {expected!r}, device reports {seen!r}"
        return evidence.refusal

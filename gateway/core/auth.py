"""The auth gate: only devices the registry knows, bound where the registry says, pass.

The registry is the validated config, and for Modbus the fingerprints pinned by ``fieldgate
enroll``. A device is admitted when it is known, enabled, observed at the endpoint it is bound
to, and its evidence satisfies what the registry requires of it (for BLE: identity, bond and
challenge, judged by :mod:`adapters.ble.admission`; for Modbus: the fingerprint it showed is
the enrolled one, judged by :mod:`adapters.modbus.admission`, or its config says
``identity = "none"`` and it is admitted as unverified). A Modbus link asks again whenever it
checks the device's identity (connect, coming back, recheck): an admitted device that fails a
later check is quarantined like one refused at its first.
Adapters only collect evidence; every verdict is taken here. A refusal is recorded as a
security event with its reason, and the device stays quarantined: none of its readings pass
:meth:`AuthGate.admitted`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Protocol

UNKNOWN_LIMIT = 1000
RECENT_ANSWERS = 32  # accepted challenge answers remembered per device, to name a replay


@dataclass(frozen=True, slots=True)
class Evidence:
    """What an adapter observed about a device when it connected."""

    device_id: str
    transport: str
    endpoint: str
    # Facts, recorded with the admission event (an identity address, a bond level).
    fingerprint: dict[str, str] = field(default_factory=dict)
    # Secret-free proofs the gate checks but never records (a challenge's nonce and answer).
    proofs: dict[str, bytes] = field(default_factory=dict)
    # Set when the adapter could not collect its evidence (pairing failed, no answer); the
    # gate refuses with this reason. Whether evidence is good enough is the gate's decision.
    refusal: str | None = None


# A security event: (kind, device id, reason, **fields), as gateway.events records it.
EventSink = Callable[..., None]


class Requirements(Protocol):
    """A transport's pure check of a device's evidence (see adapters.ble.admission)."""

    def check(
        self,
        fingerprint: Mapping[str, str],
        proofs: Mapping[str, bytes],
        accepted_answers: Collection[bytes] = (),
    ) -> tuple[str | None, dict[str, str]]: ...


@dataclass(frozen=True, slots=True)
class Registration:
    device_id: str
    transport: str
    endpoint: str
    enabled: bool = True
    requirements: Requirements | None = None


class AuthGate:
    def __init__(self, registry: list[Registration], record: EventSink) -> None:
        self._registry = {r.device_id: r for r in registry}
        self._record = record
        self._admitted: set[str] = set()
        self.quarantined: dict[str, str] = {}
        self._unknown: set[tuple[str, str]] = set()
        self._answers: dict[str, deque[bytes]] = {}

    def register(self, registration: Registration) -> None:
        """A reload added or changed a device: its registry entry is replaced, and whatever was
        judged of it is forgotten (its restarted link shows its evidence again)."""
        self.forget(registration.device_id)
        self._registry[registration.device_id] = registration

    def forget(self, device_id: str) -> None:
        """A reload removed a device: it is no longer in the registry (a link that still sees
        it reports an unknown device)."""
        self._registry.pop(device_id, None)
        self._admitted.discard(device_id)
        self.quarantined.pop(device_id, None)
        self._answers.pop(device_id, None)

    def admitted(self, device_id: str) -> bool:
        return device_id in self._admitted

    def admit(self, evidence: Evidence) -> str | None:
        """None if the device may send, else the reason it is refused (and quarantined)."""
        reason, found = self._check(evidence)
        device_id = evidence.device_id
        fingerprint = {**evidence.fingerprint, **found}
        if reason is None:
            answer = evidence.proofs.get("answer")
            if answer is not None:
                self._answers.setdefault(device_id, deque(maxlen=RECENT_ANSWERS)).append(answer)
            if device_id not in self._admitted:
                self._admitted.add(device_id)
                self._record(
                    "device-admitted",
                    device_id,
                    "registry match",
                    endpoint=evidence.endpoint,
                    transport=evidence.transport,
                    **fingerprint,
                )
            return None
        self._admitted.discard(device_id)
        self.quarantined[device_id] = reason
        self._record(
            "device-quarantined",
            device_id,
            reason,
            endpoint=evidence.endpoint,
            transport=evidence.transport,
            **fingerprint,
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
            self._record("device-unknown", None, reason, transport=transport)
            return
        self._record(
            "device-unknown",
            None,
            f"not in the registry: {seen}",
            endpoint=endpoint,
            transport=transport,
        )

    def _check(self, evidence: Evidence) -> tuple[str | None, dict[str, str]]:
        entry = self._registry.get(evidence.device_id)
        if entry is None:
            return "not in the registry", {}
        if not entry.enabled:
            return "disabled in the registry", {}
        if entry.transport != evidence.transport:
            return f"registered for {entry.transport}, seen on {evidence.transport}", {}
        if entry.endpoint != evidence.endpoint:
            return f"bound to {entry.endpoint}, seen at {evidence.endpoint}", {}
        if evidence.refusal is not None:
            return evidence.refusal, {}
        if entry.requirements is None:
            return None, {}
        return entry.requirements.check(
            evidence.fingerprint, evidence.proofs, self._answers.get(evidence.device_id, ())
        )

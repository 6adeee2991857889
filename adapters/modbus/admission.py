"""Pure Modbus admission: is the device that answered the one that was enrolled?

The link collects the evidence (:func:`adapters.modbus.identity.collect_evidence`: the FC 43
objects and identity registers the device showed); the auth gate decides with
:meth:`ModbusRequirements.check`:

- ``identity = "none"``: admitted, recorded as ``verified: "no"`` (the config says it cannot
  be verified; the admission event and the status say so);
- an identity method but nothing pinned: refused, "not enrolled: run fieldgate enroll";
- otherwise every pinned value must be seen, unchanged, and nothing more: the refusal names
  each difference, "identity mismatch: serial expected 'A123' seen 'B777'".

Values the device showed but the enrolment did not pin are differences too: a device that
now offers an object it did not offer when it was enrolled is not the device that was.

No I/O and no pymodbus here: tested without a device or a loop.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from adapters.modbus.identity import comparable

VERIFIED = "verified"  # the admission event's field: "yes" (fingerprint matches) or "no"


@dataclass(frozen=True, slots=True)
class ModbusRequirements:
    """What the registry requires of one Modbus device."""

    verify: bool  # False: identity = "none"
    pinned: Mapping[str, str] | None  # the enrolled fingerprint; None: not enrolled
    enroll_hint: str = "fieldgate enroll --config FILE"

    def check(
        self,
        fingerprint: Mapping[str, str],
        proofs: Mapping[str, bytes],
        accepted_answers: Collection[bytes] = (),
    ) -> tuple[str | None, dict[str, str]]:
        """(None if the device is the enrolled one, else why not; ``{"verified": ...}``)."""
        if not self.verify:
            return None, {VERIFIED: "no"}
        if self.pinned is None:
            return f"not enrolled: run {self.enroll_hint}", {}
        differences = mismatches(self.pinned, comparable(fingerprint))
        if differences:
            return "identity mismatch: " + "; ".join(differences), {}
        return None, {VERIFIED: "yes"}


def mismatches(expected: Mapping[str, str], seen: Mapping[str, str]) -> list[str]:
    """Each value that differs, as "NAME expected 'A' seen 'B'" (or "seen nothing")."""
    out: list[str] = []
    for name in sorted(set(expected) | set(seen)):
        want, got = expected.get(name), seen.get(name)
        if want == got:
            continue
        want_text = "nothing" if want is None else repr(want)
        got_text = "nothing" if got is None else repr(got)
        out.append(f"{name} expected {want_text} seen {got_text}")
    return out

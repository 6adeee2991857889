"""Pure BLE admission: is the device that connected the one the registry allow-lists?

The link collects the evidence (the identity address BlueZ reports, how the bond was made, the
identity an app id was bound to before, and the challenge's nonce and answer); the auth gate
decides with :meth:`BleRequirements.check`, in this order:

1. **identity**: the configured identity address, or, for a device with a resolvable private
   address, the identity its app id was first admitted with;
2. **bond**: at least the configured level (none < just-works < authenticated);
3. **challenge**: HMAC-SHA256(key, nonce || identity address), compared in constant time; an
   answer that was accepted before is named a replay.

No I/O and no bleak here: tested without a radio or a loop.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

from adapters.ble import gatt

BOND_LEVELS = {"none": 0, "just-works": 1, "authenticated": 2}
# Evidence keys (fingerprint) the link fills in, and proofs (bytes) it collects.
IDENTITY = "identity"
BOND = "bond"
BOUND = "bound"  # the identity the app id was bound to before, if any
NONCE = "nonce"
ANSWER = "answer"


@dataclass(frozen=True, slots=True)
class BleRequirements:
    """What the registry requires of one BLE device."""

    address: str | None  # its identity address, or None when matched by app id
    app_id: str | None
    bond: str  # none | just-works | authenticated
    key: bytes | None  # the challenge key; None: no challenge

    @classmethod
    def of(
        cls, address: str | None, app_id: str | None, bond: str, key_file: Path | None
    ) -> BleRequirements:
        """From a device's config (its challenge key is read from ``key_file`` now)."""
        key = None if key_file is None else gatt.read_key(key_file.read_bytes())
        return cls(address, app_id, bond, key)

    def check(
        self,
        fingerprint: Mapping[str, str],
        proofs: Mapping[str, bytes],
        accepted_answers: Collection[bytes] = (),
    ) -> tuple[str | None, dict[str, str]]:
        """(None if the evidence proves the device, else why not; what was found on the way,
        for the record: ``{"challenge": "passed" | "failed"}`` once the challenge was judged)."""
        identity = fingerprint.get(IDENTITY, "")
        if self.address is not None and identity != self.address:
            return f"identity address is {identity}, the config names {self.address}", {}
        bound = fingerprint.get(BOUND)
        if self.address is None and bound and bound != identity:
            return f"app id {self.app_id} is bound to {bound}, this device is {identity}", {}
        level = fingerprint.get(BOND, "none")
        if BOND_LEVELS.get(level, 0) < BOND_LEVELS[self.bond]:
            return f"bond is {level}, the config requires {self.bond}", {}
        if self.key is None:
            return None, {}
        reason = self._challenge(identity, proofs, accepted_answers)
        return reason, {"challenge": "failed" if reason else "passed"}

    def _challenge(
        self, identity: str, proofs: Mapping[str, bytes], accepted_answers: Collection[bytes]
    ) -> str | None:
        assert self.key is not None
        nonce, answer = proofs.get(NONCE), proofs.get(ANSWER)
        if nonce is None or answer is None:
            return "challenge not answered"
        if gatt.check_response(self.key, nonce, identity, answer):
            return None
        if answer in accepted_answers:
            return "challenge answer is a replay of an earlier one"
        return "challenge answer does not match the device key"

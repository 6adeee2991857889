"""AES-256-GCM: the one home of the AEAD that seals envelopes and wraps keys at rest.

A sealed blob is ``nonce (12 bytes) || ciphertext || tag (16 bytes)``; the associated data
binds it to its context (an envelope's header and device, a key's id).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gateway.core.errors import FieldgateError, KeyringError

NONCE_BYTES = 12
TAG_BYTES = 16


class AeadError(FieldgateError):
    """Authentication failed: tampered with, moved to another context, or another key."""


class Aead:
    def __init__(self, key: bytes) -> None:
        self._aes = AESGCM(key)

    def seal(self, plain: bytes, associated: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aes.encrypt(nonce, plain, associated)

    def open(self, sealed: bytes, associated: bytes) -> bytes:
        if len(sealed) < NONCE_BYTES + TAG_BYTES:
            raise AeadError("too short to be sealed")
        try:
            return self._aes.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], associated)
        except InvalidTag as err:
            raise AeadError("authentication failed") from err


@dataclass(frozen=True)
class Keyring:
    """AES-256 keys by key id (a consumer keeps old ids to open what was sealed before a
    rotation). How a keyring is kept at rest is :mod:`gateway.identity.keyring`'s concern."""

    keys: dict[str, bytes]

    def get(self, key_id: str) -> bytes:
        try:
            return self.keys[key_id]
        except KeyError:
            raise KeyringError(f"key id {key_id!r} is not in the keyring") from None

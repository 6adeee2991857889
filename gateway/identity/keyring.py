"""Sealing keys at rest: AES-256 keys wrapped under a passphrase (scrypt + AES-256-GCM).

The file is JSON, written 0600. Unwrapping needs the same passphrase that unlocks the gateway's
private keys; nothing in the file is usable without it. Several key ids can live side by side so
that a consumer can still open envelopes sealed before a rotation.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from gateway.core.aead import Aead, AeadError
from gateway.core.aead import Keyring as Keyring
from gateway.core.errors import KeyringError

_FORMAT = "fieldgate-keyring-v1"
_SCRYPT_N = 2**15


def _kek(passphrase: bytes, salt: bytes, n: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=8, p=1).derive(passphrase)


def write_new(path: Path, passphrase: bytes, key_id: str) -> None:
    """Create a keyring holding one fresh random key; refuses to overwrite."""
    salt = os.urandom(16)
    kek = Aead(_kek(passphrase, salt, _SCRYPT_N))
    wrapped = kek.seal(os.urandom(32), key_id.encode())
    doc = {
        "format": _FORMAT,
        "kdf": {
            "name": "scrypt",
            "n": _SCRYPT_N,
            "r": 8,
            "p": 1,
            "salt": base64.b64encode(salt).decode(),
        },
        "keys": {key_id: base64.b64encode(wrapped).decode()},
    }
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(doc, out, indent=2)


def load(path: Path, passphrase: str | bytes) -> Keyring:
    """The keyring at ``path``, unwrapped with ``passphrase`` (a str is taken as UTF-8)."""
    if isinstance(passphrase, str):
        passphrase = passphrase.encode()
    elif not isinstance(passphrase, bytes | bytearray | memoryview):
        raise KeyringError(
            f"{path}: the passphrase must be str or bytes, not {type(passphrase).__name__}"
        )
    try:
        doc = json.loads(Path(path).read_text())
        if doc.get("format") != _FORMAT:
            raise KeyringError(f"{path}: not a fieldgate keyring")
        kdf = doc["kdf"]
        kek = Aead(_kek(passphrase, base64.b64decode(kdf["salt"]), int(kdf["n"])))
        keys = {}
        for key_id, blob in doc["keys"].items():
            keys[key_id] = kek.open(base64.b64decode(blob), key_id.encode())
    except AeadError as err:
        raise KeyringError(f"{path}: wrong passphrase, or the keyring was altered") from err
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise KeyringError(f"{path}: unreadable keyring: {err}") from err
    return Keyring(keys)

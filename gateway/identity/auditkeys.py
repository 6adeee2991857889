"""The keys that sign and verify audit heads (``gateway.core.audit``): the one place they meet
``cryptography``. The gateway's own identity signs; a verifier needs only its certificate or
public key.

Two algorithms: ``ecdsa-p256-sha256`` (the development PKI's key type, and what IoT Hub takes
for an X.509 device identity, so the gateway's one identity can both connect and sign;
signatures are deterministic, RFC 6979, DER-encoded) and ``ed25519`` (for operators who bring
one).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from gateway.core.errors import PkiError

ECDSA_P256 = "ecdsa-p256-sha256"
ED25519 = "ed25519"

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey


def _algorithm(key: PrivateKey | PublicKey, where: str) -> str:
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return ED25519
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        if isinstance(key.curve, ec.SECP256R1):
            return ECDSA_P256
        raise PkiError(f"{where}: curve {key.curve.name} not supported (P-256 or Ed25519)")
    raise PkiError(f"{where}: {type(key).__name__} not supported (P-256 or Ed25519)")


@dataclass(frozen=True)
class Signer:
    """``gateway.core.audit.HeadSigner`` over a private key."""

    key: PrivateKey
    algorithm: str

    @classmethod
    def of(cls, key: PrivateKey) -> Signer:
        return cls(key, _algorithm(key, "signing key"))

    def sign(self, message: bytes) -> bytes:
        if isinstance(self.key, ed25519.Ed25519PrivateKey):
            return self.key.sign(message)
        return self.key.sign(message, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))

    def public(self) -> Verifier:
        return Verifier(self.key.public_key(), self.algorithm)


@dataclass(frozen=True)
class Verifier:
    """``gateway.core.audit.HeadVerifier`` over a public key."""

    key: PublicKey
    algorithm: str

    @classmethod
    def of(cls, key: PublicKey, where: str = "public key") -> Verifier:
        return cls(key, _algorithm(key, where))

    def verify(self, signature: bytes, message: bytes) -> bool:
        try:
            if isinstance(self.key, ed25519.Ed25519PublicKey):
                self.key.verify(signature, message)
            else:
                self.key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            return False
        return True

    def public_pem(self) -> bytes:
        return self.key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def load_verifier(path: Path, *, certificate: bool) -> Verifier:
    """The gateway's public key from its certificate PEM (the first certificate of a bundle)
    or from a public key PEM. Refuses, naming the file and why."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise PkiError(f"{path}: cannot read ({err.strerror or err})") from err
    key: object
    try:
        if certificate:
            key = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = serialization.load_pem_public_key(data)
    except ValueError as err:
        what = "an X.509 certificate" if certificate else "a public key (SubjectPublicKeyInfo)"
        raise PkiError(f"{path}: not a PEM of {what} ({err})") from err
    if not isinstance(key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey):
        raise PkiError(f"{path}: {type(key).__name__} not supported (P-256 or Ed25519)")
    return Verifier.of(key, str(path))


def load_signer(path: Path, passphrase: bytes | None) -> Signer:
    """The gateway's signing key from an (encrypted) PKCS#8 PEM."""
    key: object
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=passphrase)
    except OSError as err:
        raise PkiError(f"{path}: cannot read ({err.strerror or err})") from err
    except (ValueError, TypeError) as err:
        raise PkiError(f"{path}: not a usable private key ({err})") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
        raise PkiError(f"{path}: {type(key).__name__} not supported (P-256 or Ed25519)")
    return Signer.of(key)

"""What can be known about a device's identity before it connects: plain checks over the bytes
of its certificate and key files, returning one problem per line (``devices[3].cert: ...``).

IoT Hub takes the leaf's CN as the identity of a CA-signed device: a leaf that names another
device gets a session under that other identity, whose topic ACL drops every publish while the
broker still answers PUBACK (MQTT 3.1.1). So a start refuses such a device. A device registered
by its certificate's thumbprint (``auth = "x509-thumbprint"``) may carry any CN; every other
check still applies to it.

Checked here: the file holds a PEM certificate, CN = device id (CA-signed devices), valid now,
EKU allows clientAuth (a leaf without EKU is valid for any purpose, RFC 5280), no leaf used by
two devices, the key is encrypted. That the key matches the certificate needs the key decrypted,
which ``ssl.load_cert_chain`` does at start anyway; :func:`explain_key_failure` says which of
passphrase and key was wrong only when that load failed, so a start pays no second decryption.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

AUTH_CA = "x509-ca"
AUTH_THUMBPRINT = "x509-thumbprint"


@dataclass(frozen=True)
class Credential:
    """One device's identity files as the config names them, and their bytes."""

    where: str  # devices[3]
    device_id: str
    auth: str
    cert_path: Path
    cert_pem: bytes
    key_path: Path
    key_pem: bytes


def key_is_encrypted(key_pem: bytes) -> bool | None:
    """True for an encrypted PEM key (PKCS#8 or legacy OpenSSL), False for one in the clear,
    None when the bytes hold no PEM private key at all."""
    if b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in key_pem:
        return True
    if b"PRIVATE KEY-----" not in key_pem:
        return None
    return b"Proc-Type: 4,ENCRYPTED" in key_pem


def leaf(cert_pem: bytes) -> x509.Certificate | None:
    """The first certificate of a PEM chain, or None if there is none."""
    try:
        certs = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        return None
    return certs[0] if certs else None


def common_name(cert: x509.Certificate) -> str | None:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        return None
    value = names[0].value
    return value if isinstance(value, str) else value.decode(errors="replace")


def check_leaf(device_id: str, auth: str, cert: x509.Certificate, now: dt.datetime) -> list[str]:
    """What is wrong with one device's leaf, as reasons without the field path."""
    problems = []
    cn = common_name(cert)
    if auth == AUTH_CA and cn != device_id:
        named = "no CN" if cn is None else f"CN {cn!r}"
        problems.append(
            f"{device_id}'s certificate has {named}, not the device id: IoT Hub takes the CN as "
            "the identity of a CA-signed device (a device registered by thumbprint: "
            f'auth = "{AUTH_THUMBPRINT}")'
        )
    if now < cert.not_valid_before_utc:
        problems.append(
            f"{device_id}'s certificate is not valid before "
            f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC"
        )
    if now > cert.not_valid_after_utc:
        problems.append(
            f"{device_id}'s certificate expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC"
        )
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usages = None
    if usages is not None and not {
        ExtendedKeyUsageOID.CLIENT_AUTH,
        ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE,
    } & set(usages):
        problems.append(
            f"{device_id}'s certificate does not allow TLS client authentication "
            "(its extended key usage lacks clientAuth)"
        )
    return problems


def check(
    credentials: Iterable[Credential], *, allow_clear_keys: bool, now: dt.datetime | None = None
) -> list[str]:
    """Every problem of every device's identity, one line each, naming the field."""
    now = now or dt.datetime.now(dt.UTC)
    problems: list[str] = []
    owners: dict[bytes, Credential] = {}
    for cred in credentials:
        cert = leaf(cred.cert_pem)
        if cert is None:
            problems.append(f"{cred.where}.cert: no PEM certificate in {cred.cert_path}")
        else:
            problems += [
                f"{cred.where}.cert: {p}" for p in check_leaf(cred.device_id, cred.auth, cert, now)
            ]
            fingerprint = cert.fingerprint(hashes.SHA256())
            first = owners.setdefault(fingerprint, cred)
            if first is not cred:
                problems.append(
                    f"{cred.where}.cert: {cred.device_id} uses the certificate of "
                    f"{first.where} ({first.device_id}); one identity, one session: each device "
                    "needs its own"
                )
        encrypted = key_is_encrypted(cred.key_pem)
        if encrypted is None:
            problems.append(f"{cred.where}.key: no PEM private key in {cred.key_path}")
        elif not encrypted and not allow_clear_keys:
            problems.append(
                f"{cred.where}.key: {cred.device_id}'s key {cred.key_path} is in the clear; "
                "encrypt it (PKCS#8 under the passphrase) or set secrets.allow_clear_keys = true"
            )
    return problems


def explain_key_failure(cert_pem: bytes, key_pem: bytes, passphrase: bytes) -> str:
    """Why a certificate and key did not load together: wrong passphrase, or a key that is not
    the certificate's. Called only after ``ssl`` refused them."""
    try:
        key = serialization.load_pem_private_key(
            key_pem, password=passphrase if key_is_encrypted(key_pem) else None
        )
    except (ValueError, TypeError):
        return "wrong passphrase, or a damaged key"
    cert = leaf(cert_pem)
    if cert is None:
        return "no PEM certificate"
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, public) != cert.public_key().public_bytes(der, public):
        return "the key does not belong to the certificate"
    return "the certificate and key did not load together"


def check_modbus_client(
    where: str,
    cert_path: Path,
    cert_pem: bytes,
    key_path: Path,
    key_pem: bytes,
    *,
    allow_clear_keys: bool,
    now: dt.datetime | None = None,
) -> list[str]:
    """What is wrong with the gateway's client identity for a Modbus/TCP Security link
    (``where`` is ``devices[3].modbus.tls``): a leaf valid now, for clientAuth, carrying the
    Modbus role a device authorizes by (without one, a device answers every request with
    exception 01), and a key encrypted at rest like every device key."""
    from gateway.core.errors import PkiError
    from gateway.identity.pki import MODBUS_ROLE_OID, modbus_role

    now = now or dt.datetime.now(dt.UTC)
    problems: list[str] = []
    cert = leaf(cert_pem)
    if cert is None:
        problems.append(f"{where}.cert: no PEM certificate in {cert_path}")
    else:
        name = f"the Modbus client {common_name(cert) or '(no CN)'}"
        problems += [f"{where}.cert: {p}" for p in check_leaf(name, AUTH_THUMBPRINT, cert, now)]
        try:
            role = modbus_role(cert)
        except PkiError as err:
            problems.append(f"{where}.cert: {cert_path}: {err}")
        else:
            if role is None:
                problems.append(
                    f"{where}.cert: {cert_path} carries no Modbus role (extension "
                    f"{MODBUS_ROLE_OID.dotted_string}); issue one with `fieldgate pki issue "
                    "--modbus-role ROLE`"
                )
    encrypted = key_is_encrypted(key_pem)
    if encrypted is None:
        problems.append(f"{where}.key: no PEM private key in {key_path}")
    elif not encrypted and not allow_clear_keys:
        problems.append(
            f"{where}.key: {key_path} is in the clear; encrypt it (PKCS#8 under the "
            "passphrase) or set secrets.allow_clear_keys = true"
        )
    return problems

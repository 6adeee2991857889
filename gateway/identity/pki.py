"""A development PKI made with ``cryptography``: root -> intermediate -> device leaves.

Layout of a PKI folder::

    root.pem                           the development root (the broker trusts only this)
    intermediate.pem  intermediate.key the CA the gateway holds and issues from
    hub/server.pem  hub/server.key     the local hub stand-in's TLS certificate (+ intermediate)
    hub/service.pem hub/service.key    the hub-side consumer's identity (CN hub-service)
    gateway.pem  gateway.key           the gateway's own identity (CN = the gateway's id): it
                                       signs the audit log's heads and sends the audit stream
    devices/{id}.pem  devices/{id}.key a device: leaf + intermediate, and its key (also the
                                       gateway's Modbus/TCP Security client identity, issued
                                       with ``--modbus-role``)
    keyring.json                       sealing keys, wrapped under the passphrase
    passphrase                         0600, only when FIELDGATE_KEY_PASSPHRASE was not set

Every private key is PKCS#8 encrypted under the passphrase; none is written in the clear. The
root's key is not kept here, where the gateway and its passphrase are: ``init`` writes it only
to a path given outside this folder (``--root-key``), else it is gone once the intermediate is
signed. This is a development PKI; operators who bring their own certificates point the config
at them instead.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

from gateway.config import DEVICE_ID_PATTERN
from gateway.core.errors import PkiError
from gateway.identity import keyring

PASSPHRASE_ENV = "FIELDGATE_KEY_PASSPHRASE"
SERVICE_IDENTITY = "hub-service"
# A second, read-only consumer of telemetry (the loadtest's), beside a running hub-service:
# on the stand-in the client id is the certificate's CN, so two consumers need two identities.
MONITOR_IDENTITY = "hub-monitor"
DEFAULT_KEY_ID = "k1"
DEFAULT_GATEWAY_ID = "fieldgate"

# Modbus/TCP Security (the Modbus Organization's TLS profile): the client's role, an X.509v3
# extension whose value is a DER UTF8String. The device authorizes requests by this role.
MODBUS_ROLE_OID = ObjectIdentifier("1.3.6.1.4.1.50316.802.1")
_UTF8STRING = 0x0C
# What a role may be: printable, no controls (it ends up in logs and a device's rule table).
MODBUS_ROLE_PATTERN = r"^[^\x00-\x1f\x7f]{1,128}$"


@dataclass(frozen=True)
class Pki:
    root: Path

    @property
    def root_cert(self) -> Path:
        return self.root / "root.pem"

    @property
    def keyring(self) -> Path:
        return self.root / "keyring.json"

    @property
    def passphrase_file(self) -> Path:
        return self.root / "passphrase"

    def device_cert(self, device_id: str) -> Path:
        return self.root / "devices" / f"{device_id}.pem"

    def device_key(self, device_id: str) -> Path:
        return self.root / "devices" / f"{device_id}.key"

    @property
    def gateway_cert(self) -> Path:
        return self.root / "gateway.pem"

    @property
    def gateway_key(self) -> Path:
        return self.root / "gateway.key"

    def gateway_id(self) -> str | None:
        """The CN of the gateway's certificate, None when the PKI has none."""
        try:
            cert = x509.load_pem_x509_certificate(self.gateway_cert.read_bytes())
        except FileNotFoundError:
            return None
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(names[0].value) if names else None

    @property
    def server_cert(self) -> Path:
        return self.root / "hub" / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "hub" / "server.key"

    @property
    def service_cert(self) -> Path:
        return self.root / "hub" / "service.pem"

    def hub_identity(self, name: str) -> tuple[Path, Path]:
        """Certificate and key of a hub-side identity (``hub-service``, ``hub-monitor``)."""
        return self.root / "hub" / f"{name}.pem", self.root / "hub" / f"{name}.key"

    @property
    def service_key(self) -> Path:
        return self.root / "hub" / "service.key"

    def passphrase(self) -> bytes:
        """The environment variable wins; otherwise the PKI's own 0600 passphrase file."""
        value = os.environ.get(PASSPHRASE_ENV)
        if value:
            return value.encode()
        try:
            return self.passphrase_file.read_bytes().strip()
        except FileNotFoundError:
            raise PkiError(
                f"no passphrase: set {PASSPHRASE_ENV} or create {self.passphrase_file}"
            ) from None


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.replace(tmp, path)


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _key_pem(key: ec.EllipticCurvePrivateKey, passphrase: bytes) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(passphrase),
    )


def _cert_pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fieldgate"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer_key_public: ec.EllipticCurvePublicKey | None,
    days: int,
    *,
    ca: bool,
    path_length: int | None,
    start: dt.datetime | None = None,
    until: dt.datetime | None = None,
) -> x509.CertificateBuilder:
    """What every certificate here shares: validity (``days`` from ``start``, unless ``until``
    says otherwise), constraints, key usage, key ids."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start or _now())
        .not_valid_after(until or (start or _now()) + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not ca,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer_key_public is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key_public), critical=False
        )
    return builder


def _issuer_public(cert: x509.Certificate) -> ec.EllipticCurvePublicKey:
    public = cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise PkiError(f"{cert.subject.rfc4514_string()}: not an EC key")
    return public


def _ca(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    path_length: int,
    days: int,
) -> x509.Certificate:
    builder = _builder(
        _name(subject),
        issuer.subject if issuer else _name(subject),
        key,
        _issuer_public(issuer) if issuer else None,
        days,
        ca=True,
        path_length=path_length,
    )
    return builder.sign(issuer_key, hashes.SHA256())


def _leaf(
    cn: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    server: bool,
    days: int,
    sans: Iterable[x509.GeneralName] = (),
    start: dt.datetime | None = None,
    until: dt.datetime | None = None,
    modbus_role: str | None = None,
) -> x509.Certificate:
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = _builder(
        _name(cn),
        issuer.subject,
        key,
        _issuer_public(issuer),
        days,
        ca=False,
        path_length=None,
        start=start,
        until=until,
    )
    builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    names = list(sans)
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if modbus_role is not None:
        # Non-critical, as the spec has it: a TLS stack that does not know the OID still
        # accepts the certificate; the Modbus layer above it reads the role.
        builder = builder.add_extension(
            x509.UnrecognizedExtension(MODBUS_ROLE_OID, modbus_role_der(modbus_role)),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def init(
    root: Path,
    *,
    server_names: Iterable[str] = ("localhost",),
    server_ips: Iterable[str] = ("127.0.0.1", "::1"),
    root_name: str = "fieldgate dev root",
    root_key: Path | None = None,
    gateway_id: str = DEFAULT_GATEWAY_ID,
) -> Pki:
    """Create a development root, an intermediate, the hub stand-in's certificates, the
    gateway's own identity and a sealing keyring. Refuses to touch a folder that already holds
    a root. The root's key is written only to ``root_key``, which must lie outside the folder."""
    pki = Pki(Path(root))
    if pki.root_cert.exists():
        raise PkiError(f"{pki.root_cert} exists already; refusing to replace a PKI")
    if not re.match(DEVICE_ID_PATTERN, gateway_id):
        raise PkiError(
            f"--gateway-id {gateway_id!r} is not a valid device id ({DEVICE_ID_PATTERN})"
        )
    if root_key is not None:
        if Path(root_key).resolve().is_relative_to(pki.root.resolve()):
            raise PkiError(
                f"--root-key {root_key} is inside {pki.root}: keep the root's key away from "
                "the folder the gateway reads"
            )
        if Path(root_key).exists():
            raise PkiError(f"--root-key {root_key} exists already; refusing to replace it")
    pki.root.mkdir(parents=True, exist_ok=True)
    os.chmod(pki.root, 0o700)
    if not os.environ.get(PASSPHRASE_ENV) and not pki.passphrase_file.exists():
        _write_private(pki.passphrase_file, secrets.token_urlsafe(32).encode() + b"\n")
    passphrase = pki.passphrase()

    ca_key = _new_key()
    root_cert = _ca(root_name, ca_key, None, ca_key, path_length=1, days=3650)
    inter_key = _new_key()
    inter_cert = _ca(
        "fieldgate gateway intermediate", inter_key, root_cert, ca_key, path_length=0, days=1825
    )
    if root_key is not None:
        _write_private(Path(root_key), _key_pem(ca_key, passphrase))
    _write_public(pki.root_cert, _cert_pem(root_cert))
    _write_private(pki.root / "intermediate.key", _key_pem(inter_key, passphrase))
    _write_public(pki.root / "intermediate.pem", _cert_pem(inter_cert))

    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in server_names]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in server_ips]
    server_key = _new_key()
    server = _leaf("localhost", server_key, inter_cert, inter_key, server=True, days=825, sans=sans)
    _write_private(pki.server_key, _key_pem(server_key, passphrase))
    _write_public(pki.server_cert, _cert_pem(server, inter_cert))
    _issue_client(
        pki,
        SERVICE_IDENTITY,
        inter_cert,
        inter_key,
        passphrase,
        pki.service_cert,
        pki.service_key,
        days=825,
    )
    _issue_client(
        pki, gateway_id, inter_cert, inter_key, passphrase, pki.gateway_cert, pki.gateway_key, 825
    )
    if not pki.keyring.exists():
        keyring.write_new(pki.keyring, passphrase, DEFAULT_KEY_ID)
    return pki


def _load_intermediate(
    pki: Pki, passphrase: bytes
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate((pki.root / "intermediate.pem").read_bytes())
        key = serialization.load_pem_private_key(
            (pki.root / "intermediate.key").read_bytes(), password=passphrase
        )
    except FileNotFoundError as err:
        raise PkiError(f"{pki.root}: no intermediate CA; run `fieldgate pki init` first") from err
    except ValueError as err:
        raise PkiError(f"{pki.root}/intermediate.key: wrong passphrase or damaged key") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError("the intermediate key is not an EC key")
    return cert, key


def _issue_client(
    pki: Pki,
    cn: str,
    inter_cert: x509.Certificate,
    inter_key: ec.EllipticCurvePrivateKey,
    passphrase: bytes,
    cert_path: Path,
    key_path: Path,
    days: int,
    modbus_role: str | None = None,
) -> None:
    key = _new_key()
    leaf = _leaf(cn, key, inter_cert, inter_key, server=False, days=days, modbus_role=modbus_role)
    _write_private(key_path, _key_pem(key, passphrase))
    _write_public(cert_path, _cert_pem(leaf, inter_cert))


def existing(root: Path, device_ids: Iterable[str]) -> list[str]:
    """The ids among ``device_ids`` that already have a certificate or a key in the PKI."""
    pki = Pki(Path(root))
    return [d for d in device_ids if pki.device_cert(d).exists() or pki.device_key(d).exists()]


def issue(
    root: Path,
    device_ids: Iterable[str],
    *,
    days: int = 365,
    renew: bool = False,
    modbus_role: str | None = None,
) -> list[str]:
    """Issue a leaf (CN = device id, EKU clientAuth) per device; returns the ids issued.
    An id that has an identity already is refused (nothing is issued) unless ``renew``: a new
    key changes the thumbprint a hub may have registered, and the old key is gone.
    ``modbus_role``: the leaf also carries the Modbus/TCP Security role extension, for the
    gateway's side of a TLS link to a device."""

    pki = Pki(Path(root))
    ids = list(device_ids)
    for device_id in ids:
        if not re.match(DEVICE_ID_PATTERN, device_id):
            raise PkiError(f"{device_id!r} is not a valid device id ({DEVICE_ID_PATTERN})")
    if modbus_role is not None and not re.match(MODBUS_ROLE_PATTERN, modbus_role):
        raise PkiError(
            f"--modbus-role {modbus_role!r}: a role is 1 to 128 characters, no control characters"
        )
    taken = existing(root, ids)
    if taken and not renew:
        raise PkiError(
            f"{', '.join(taken)}: an identity exists already ({pki.device_cert(taken[0])}); "
            "refusing to replace it: pass --renew to issue a new certificate and key"
        )
    passphrase = pki.passphrase()
    inter_cert, inter_key = _load_intermediate(pki, passphrase)
    done = []
    for device_id in ids:
        _issue_client(
            pki,
            device_id,
            inter_cert,
            inter_key,
            passphrase,
            pki.device_cert(device_id),
            pki.device_key(device_id),
            days,
            modbus_role,
        )
        done.append(device_id)
    return done


def ensure_hub_identity(root: Path, name: str) -> tuple[Path, Path]:
    """The certificate and key of a hub-side identity, issued now if the PKI lacks it."""
    pki = Pki(Path(root))
    if name == SERVICE_IDENTITY:
        return pki.service_cert, pki.service_key
    cert, key = pki.hub_identity(name)
    if not cert.exists():
        passphrase = pki.passphrase()
        inter_cert, inter_key = _load_intermediate(pki, passphrase)
        _issue_client(pki, name, inter_cert, inter_key, passphrase, cert, key, days=825)
    return cert, key


def ensure_gateway(root: Path, gateway_id: str = DEFAULT_GATEWAY_ID) -> str:
    """The gateway's identity, issued now if the PKI (made before it had one) lacks it;
    returns its id (an existing identity keeps its own)."""
    pki = Pki(Path(root))
    have = pki.gateway_id()
    if have is not None:
        return have
    passphrase = pki.passphrase()
    inter_cert, inter_key = _load_intermediate(pki, passphrase)
    _issue_client(
        pki, gateway_id, inter_cert, inter_key, passphrase, pki.gateway_cert, pki.gateway_key, 825
    )
    return gateway_id


def decrypted_key_pem(key_path: Path, passphrase: bytes) -> bytes:
    """The key unencrypted, for a process that cannot take a passphrase (the broker of the
    local hub stand-in); the caller keeps it off persistent disk."""
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=passphrase)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def modbus_role_der(role: str) -> bytes:
    """The role extension's value: ``role`` as a DER UTF8String (tag, definite length, bytes)."""
    data = role.encode("utf-8")
    if len(data) < 0x80:
        length = bytes([len(data)])
    else:
        size = len(data).to_bytes((len(data).bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(size)]) + size
    return bytes([_UTF8STRING]) + length + data


def modbus_role(cert: x509.Certificate | bytes) -> str | None:
    """The Modbus/TCP Security role a certificate (an object, or DER as TLS hands it over)
    carries, or None when it has no role extension. A role extension that is not one DER
    UTF8String raises :class:`PkiError`: a device must refuse it, not guess."""
    if isinstance(cert, bytes):
        try:
            cert = x509.load_der_x509_certificate(cert)
        except ValueError as err:
            raise PkiError(f"not a DER certificate: {err}") from err
    try:
        ext = cert.extensions.get_extension_for_oid(MODBUS_ROLE_OID)
    except x509.ExtensionNotFound:
        return None
    value = ext.value
    raw = value.value if isinstance(value, x509.UnrecognizedExtension) else b""
    return _utf8string(raw)


def _utf8string(raw: bytes) -> str:
    why = "not a DER UTF8String"
    if len(raw) >= 2 and raw[0] == _UTF8STRING:
        first = raw[1]
        if first < 0x80:
            start, length = 2, first
        else:
            size = first & 0x7F
            start, length = 2 + size, -1
            if 0 < size <= 4 and len(raw) >= start and raw[2] != 0:
                length = int.from_bytes(raw[2:start], "big")
                if length < 0x80:
                    length = -1  # DER: the long form only when needed, no leading zero octets
        if length >= 0 and start + length == len(raw):
            try:
                return raw[start:].decode("utf-8")
            except UnicodeDecodeError:
                why = "a UTF8String that is not UTF-8"
    raise PkiError(f"Modbus role extension ({MODBUS_ROLE_OID.dotted_string}): {why}")

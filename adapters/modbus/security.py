"""Modbus/TCP Security, the gateway's side: the client TLS context, and the checks and words
for a device that is refused.

The Modbus Organization's profile is mutual TLS (1.2 or newer) on port 802: the device proves
itself with a certificate from a CA the operator configures; the gateway presents its own,
which carries its *role* (an X.509v3 extension, OID 1.3.6.1.4.1.50316.802.1, issued by
``fieldgate pki issue --modbus-role``), and the device authorizes each request by that role
(an unauthorized one is answered with exception 01, Illegal Function).

Devices are addressed by IP and rarely carry a name a gateway could check, so the device's
certificate is verified against the configured CA only, unless ``server_name`` is configured;
a pinned SHA-256 fingerprint of the device's certificate, when configured, is checked after the
handshake (the CA may have issued other devices' certificates too).

No pymodbus here (:mod:`.transport` makes the connection) and no ``cryptography`` (the adapter
builds on ``gateway.core`` only): the standard library's ``ssl`` and ``hashlib`` suffice. The
role is read from a certificate in :func:`gateway.identity.pki.modbus_role`, which the
simulated device uses.
"""

from __future__ import annotations

import hashlib
import ssl

from adapters.modbus.config import ModbusTls
from gateway.core.errors import EXIT_REFUSED, DeviceUnavailable, FieldgateError
from gateway.core.tlsprofile import MIN_VERSION, TLS12_CIPHERS

# The Modbus exception a device answers to a request its rules do not allow the client's role.
ROLE_REFUSED = 0x01

# Which check refused a device (the ``check`` of :class:`TlsRefused` and of its event).
UNKNOWN_CA = "unknown-ca"
EXPIRED = "expired"
NOT_YET_VALID = "not-yet-valid"
NAME_MISMATCH = "name-mismatch"
FINGERPRINT = "fingerprint"
BAD_CERTIFICATE = "bad-certificate"  # the device's certificate is unusable otherwise
REFUSED_US = "refused-our-certificate"  # the device did not accept the gateway's certificate
HANDSHAKE = "handshake"  # no TLS agreement (versions, suites, not TLS at all)

# OpenSSL's X509_V_ERR_* codes (ssl.SSLCertVerificationError.verify_code) -> check.
_VERIFY_CODES: dict[int, str] = {
    9: NOT_YET_VALID,  # CERT_NOT_YET_VALID
    10: EXPIRED,  # CERT_HAS_EXPIRED
    18: UNKNOWN_CA,  # DEPTH_ZERO_SELF_SIGNED_CERT
    19: UNKNOWN_CA,  # SELF_SIGNED_CERT_IN_CHAIN
    20: UNKNOWN_CA,  # UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    21: UNKNOWN_CA,  # UNABLE_TO_VERIFY_LEAF_SIGNATURE
    2: UNKNOWN_CA,  # UNABLE_TO_GET_ISSUER_CERT
    62: NAME_MISMATCH,  # HOSTNAME_MISMATCH
    64: NAME_MISMATCH,  # IP_ADDRESS_MISMATCH
}
# TLS alerts the device sends when it does not accept the gateway's certificate.
_REFUSED_US_ALERTS = (
    "ALERT_UNKNOWN_CA",
    "ALERT_BAD_CERTIFICATE",
    "ALERT_CERTIFICATE_REQUIRED",
    "ALERT_CERTIFICATE_EXPIRED",
    "ALERT_CERTIFICATE_UNKNOWN",
    "ALERT_UNSUPPORTED_CERTIFICATE",
    "ALERT_ACCESS_DENIED",
)


class ModbusTlsError(FieldgateError):
    """The gateway's own TLS files for a device do not load (a refused start)."""

    exit_code = EXIT_REFUSED


class TlsRefused(DeviceUnavailable):
    """A device refused at the TLS layer: ``check`` names which check failed (one of the
    constants above), ``reason`` says it in words a user can act on."""

    def __init__(self, device_id: str, endpoint: str, check: str, reason: str) -> None:
        super().__init__(device_id, endpoint, f"TLS refused ({check}): {reason}", cause="refused")
        self.check = check
        self.detail = reason


def client_context(tls: ModbusTls, passphrase: bytes | None) -> ssl.SSLContext:
    """The client context for one device: TLS 1.2+, forward-secret AEAD suites, the device
    verified against ``tls.ca`` (its name only when ``tls.server_name`` is set), the gateway's
    chain ``tls.cert`` with its key ``tls.key`` (encrypted under ``passphrase``)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = MIN_VERSION
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.check_hostname = tls.server_name is not None
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_verify_locations(cafile=str(tls.ca))
    except (OSError, ssl.SSLError) as err:
        raise ModbusTlsError(f"tls.ca: cannot load {tls.ca}: {_why(err)}") from err
    try:
        ctx.load_cert_chain(str(tls.cert), str(tls.key), password=passphrase or b"")
    except (OSError, ssl.SSLError) as err:
        raise ModbusTlsError(
            f"tls.cert/tls.key: cannot load {tls.cert} with {tls.key}: {_why(err)} (wrong "
            "passphrase, or the key does not belong to the certificate)"
        ) from err
    return ctx


def fingerprint(der: bytes) -> str:
    """A certificate's SHA-256 fingerprint as config spells it: 64 lowercase hex digits."""
    return hashlib.sha256(der).hexdigest()


def _colons(digits: str) -> str:
    return ":".join(digits[i : i + 2] for i in range(0, len(digits), 2)).upper()


def check_peer(tls: ModbusTls, der: bytes | None) -> tuple[str, str] | None:
    """After a verified handshake: (check, reason) when the device's certificate is not the
    pinned one (or none was presented), None when it passes."""
    if der is None:
        return BAD_CERTIFICATE, "the device presented no certificate"
    if tls.fingerprint is not None and fingerprint(der) != tls.fingerprint:
        return FINGERPRINT, (
            f"the device's certificate has SHA-256 fingerprint {_colons(fingerprint(der))}, "
            f"not the pinned {_colons(tls.fingerprint)} (tls.fingerprint)"
        )
    return None


def explain(err: BaseException) -> tuple[str, str] | None:
    """Which check a failed handshake tripped, and why, from what ``ssl`` raised; None when
    the failure is not TLS's (a refused TCP connection, a timeout)."""
    if isinstance(err, ssl.SSLCertVerificationError):
        message = err.verify_message or err.reason or str(err)
        check = _VERIFY_CODES.get(err.verify_code or -1, BAD_CERTIFICATE)
        return check, _verify_words(check, message)
    if isinstance(err, ssl.SSLError):
        reason = str(err.reason or "")
        if reason.startswith(("SSLV3_", "TLSV1_", "TLSV13_")) and reason.endswith(
            _REFUSED_US_ALERTS
        ):
            return REFUSED_US, (
                f"the device did not accept the gateway's certificate (TLS alert {reason}); "
                "is tls.cert issued by a CA the device trusts, and valid?"
            )
        return HANDSHAKE, f"TLS handshake failed: {_why(err)}"
    if isinstance(err, ConnectionResetError):
        # TCP was accepted, then dropped mid-handshake: what a TLS stack does when it finds no
        # version or suite in common (or a device that does not speak TLS on this port).
        return HANDSHAKE, (
            "TLS handshake failed: the device closed the connection during it (no TLS version "
            "or forward-secret AEAD suite in common, or not a Modbus/TCP Security port)"
        )
    return None


def _verify_words(check: str, message: str) -> str:
    hint = {
        UNKNOWN_CA: "the device's certificate is not issued by tls.ca",
        EXPIRED: "the device's certificate has expired",
        NOT_YET_VALID: "the device's certificate is not valid yet (check the clocks)",
        NAME_MISMATCH: "the device's certificate does not name tls.server_name",
    }.get(check, "the device's certificate did not verify")
    return f"{hint} ({message})"


def _why(err: BaseException) -> str:
    reason = getattr(err, "reason", None)
    return str(reason) if reason else (getattr(err, "strerror", None) or str(err))

"""TLS for the uplink: the one place a device's client context is made.

TLS 1.2 or newer, the suites of :mod:`gateway.core.tlsprofile` (shared with Modbus/TCP
Security). The hub is verified against the configured roots, and the device presents its own
chain, its key encrypted at rest.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from gateway.core.errors import UplinkError
from gateway.core.tlsprofile import MIN_VERSION, TLS12_CIPHERS

__all__ = ["TLS12_CIPHERS", "client_context"]


def client_context(ca_file: Path, cert: Path, key: Path, passphrase: bytes) -> ssl.SSLContext:
    """TLS 1.2+ client context, AEAD suites only, that verifies the hub against ``ca_file``
    and presents a device certificate chain whose key is encrypted under ``passphrase``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = MIN_VERSION
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.load_verify_locations(cafile=str(ca_file))
    try:
        ctx.load_cert_chain(str(cert), str(key), password=passphrase)
    except ssl.SSLError as err:
        raise UplinkError(
            f"cannot load certificate {cert} with key {key}: {err.reason or err} "
            "(wrong passphrase, or the key does not match the certificate)",
            retryable=False,
        ) from err
    return ctx

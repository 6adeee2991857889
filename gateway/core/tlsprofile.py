"""The one TLS profile fieldgate speaks, on every side: the uplink to the hub, the hub stand-in,
and Modbus/TCP Security to devices.

TLS 1.2 or newer; on TLS 1.2 only ECDHE suites (forward secrecy) with AES-GCM or
ChaCha20-Poly1305 (OpenSSL's defaults add CBC suites); TLS 1.3's suites as they are (all of
them are forward-secret AEAD). It lives in ``core`` because both ``gateway.identity`` and the
Modbus adapter (which may import only ``core``) build contexts from it.
"""

from __future__ import annotations

import ssl

MIN_VERSION = ssl.TLSVersion.TLSv1_2

TLS12_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-RSA-CHACHA20-POLY1305",
    )
)
